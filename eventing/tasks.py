"""The relay task. Beat runs it every second; commits wake it sooner."""

from __future__ import annotations

from celery import shared_task

from . import relay


@shared_task(name="eventing.relay", ignore_result=True, acks_late=False)
def relay_task(follow_up: bool = False) -> dict[str, int]:
    # acks_late is off on purpose: a relay run is a tick, not a unit of work;
    # redelivering it after a crash would only add a duplicate tick.
    report = relay.relay(follow_up=follow_up)
    return {"published": report.published_rows, "failed": report.failed_rows}


# [observability] beat samples consumer lag for the dashboard's last-hour chart.
@shared_task(name="eventing.sample_lag", ignore_result=True, acks_late=False)
def sample_lag_task() -> int:
    from .dashboard import sample_consumer_lag

    return sample_consumer_lag()
