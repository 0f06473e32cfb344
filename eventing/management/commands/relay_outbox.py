"""Run the relay in this process: once, or in a loop woken by commits."""

from __future__ import annotations

import json
import signal
import time
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections

from eventing import relay


class Command(BaseCommand):
    help = (
        "Publish pending outbox rows to RabbitMQ (the same relay Celery beat runs every "
        "second). Without --loop it drains the outbox once and exits. With --loop it is a "
        "relay process: it runs whenever a commit sends a wake-up by NOTIFY "
        "(EVENTING_RELAY_WAKE=notify), and at least every --interval seconds."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--loop", action="store_true", help="Keep relaying until Ctrl-C or SIGTERM."
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=0.5,
            help="With --loop: the longest wait between runs without a wake-up (seconds).",
        )
        parser.add_argument(
            "--linger",
            type=float,
            default=None,
            help=(
                "With --loop: after a run that published, while a consumer queue holds "
                "messages no worker has taken, wait up to this long from its start before "
                "the next, so that a busy outbox goes out in fuller batches "
                "(seconds; default EVENTING_RELAY_LINGER_SECONDS)."
            ),
        )
        parser.add_argument("--json", action="store_true", help="Print a JSON report.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["interval"] <= 0:
            raise CommandError("--interval must be a positive number of seconds, e.g. 0.5")
        if not options["loop"]:
            report = relay.relay()
            self._print(report, options["json"])
            if report.failed_rows:
                raise CommandError(
                    "some rows were not published; they stay in the outbox and are retried "
                    "(is RabbitMQ up? see `manage.py eventing_status`)"
                )
            return
        linger = options["linger"]
        if linger is None:
            linger = settings.EVENTING["RELAY_LINGER_SECONDS"]
        if linger < 0:
            raise CommandError("--linger must be zero or a positive number of seconds, e.g. 1")
        self._loop(options["interval"], linger, options["json"], options["verbosity"])

    def _loop(self, interval: float, linger: float, as_json: bool, verbosity: int) -> None:
        stopping = False
        waiting = False

        def stop(signum: int, frame: FrameType | None) -> None:
            # A run under way finishes (its batch commits or rolls back); a
            # wait ends at once (select() would resume after the handler).
            nonlocal stopping
            stopping = True
            if waiting:
                raise _Stopped

        def wait(seconds: float, *, for_notify: bool = True) -> None:
            nonlocal waiting
            waiting = True
            try:
                if stopping:
                    return
                if for_notify:
                    listener.wait(seconds)
                elif seconds > 0:
                    time.sleep(seconds)
            finally:
                waiting = False

        signal.signal(signal.SIGTERM, stop)
        listener = relay.WakeListener()
        # Woken at once after each commit, a relay would publish a few rows a
        # run, and every consumer would get a message (a task) per few
        # events: fine while the consumers keep up, but once they fall behind
        # those extra tasks are what they cannot afford (at 200 orders/s here
        # the saga fell about three times further behind than with the relay
        # task, which waits its turn in the worker's pool). So while a consumer
        # queue holds messages no worker has taken, the next run waits (up to
        # the linger from this run's start, looking every LINGER_POLL_SECONDS):
        # what it would publish would only queue behind them. What commits
        # meanwhile finds the wake-up flag set, sends no NOTIFY, and goes out
        # in the next run's fuller batch, as the queue runs dry.
        published_last_run = False
        last_run_started = 0.0
        try:
            # Listen before the first run: what commits after this asks by
            # NOTIFY, what committed before, the first run claims.
            wait(0)
            mode = settings.EVENTING["RELAY_WAKE"]
            self.stdout.write(
                f"relay process: listening on {relay.WAKE_CHANNEL}; runs on each wake-up by "
                f"NOTIFY and at least every {interval:g} s (EVENTING_RELAY_WAKE={mode}"
                + ("" if mode == relay.WAKE_BY_NOTIFY else ": commits wake the worker's relay")
                + ")"
            )
            self.stdout.flush()
            while not stopping:
                if published_last_run and linger > 0:
                    lingered_until = last_run_started + linger
                    while not stopping and _consumers_behind():
                        remaining = lingered_until - time.monotonic()
                        if remaining <= 0:
                            break
                        wait(min(LINGER_POLL_SECONDS, remaining), for_notify=False)
                    if stopping:
                        break
                # This run claims after the commits of the notifications that
                # have arrived: take them off the connection, or the wait
                # after the run would end at once for nothing.
                listener.wait(0)
                close_old_connections()  # CONN_MAX_AGE and health checks, as per request
                last_run_started = time.monotonic()
                try:
                    # follow_up=True: a run that cannot clear the wake-up flag
                    # sends no follow-up relay task; this loop is the follow-up.
                    report = relay.relay(follow_up=True)
                except Exception as exc:  # the run rolled back; the rows wait in the outbox
                    self.stderr.write(f"relay run failed: {type(exc).__name__}: {exc}")
                    published_last_run = False
                    wait(min(interval, relay.FOLLOW_UP_SECONDS))
                    continue
                published_last_run = report.published_rows > 0
                if as_json or report.failed_rows or (report.batches and verbosity >= 2):
                    self._print(report, as_json)
                # A run that ended with rows left (its time budget spent) has
                # asked for the next one, by NOTIFY in "notify" mode: the
                # wait then returns at once. With the flag left set, commits
                # ask for nothing: look again soon.
                wait(min(interval, relay.FOLLOW_UP_SECONDS) if report.flag_left_set else interval)
        except _Stopped:
            pass
        finally:
            listener.close()

    def _print(self, report: relay.RelayReport, as_json: bool) -> None:
        if as_json:
            summary = {
                "published": report.published_rows,
                "messages": report.messages,
                "failed": report.failed_rows,
                "batches": report.batches,
                "errors": report.errors,
            }
            self.stdout.write(json.dumps(summary))
            return
        self.stdout.write(
            f"published {report.published_rows} row(s) as {report.messages} message(s)"
            f" in {report.batches} batch(es); {report.failed_rows} failed"
            + (f": {'; '.join(report.errors)}" if report.errors else "")
        )


# How often a lingering relay process looks at the consumer queues again.
LINGER_POLL_SECONDS = 0.05


class _Stopped(Exception):
    """SIGTERM arrived while the loop waited."""


def _consumers_behind() -> bool:
    try:
        return relay.consumers_behind()
    except Exception:  # the broker's trouble shows in the next run's publish
        return False
