from __future__ import annotations

from typing import Any

from celery import shared_task

from eventing.consumers import consumer_task

from . import services

handle_event = consumer_task("notifications")


@shared_task(name="notifications.send_unsent", ignore_result=True)
def send_unsent() -> int:
    """Beat's sweep: on_commit is a hint, not a delivery guarantee."""
    unsent = services.notifications_unsent(older_than_seconds=30)
    # In tasks of SWEEP_BATCH: one send holds its rows' locks (and a
    # worker process) until its last mail has left.
    for start in range(0, len(unsent), SWEEP_BATCH):
        send_notifications.delay(unsent[start : start + SWEEP_BATCH])
    return len(unsent)


SWEEP_BATCH = 50


@shared_task(
    name="notifications.send_batch",
    bind=True,
    acks_late=True,
    ignore_result=True,
    max_retries=8,
)
def send_notifications(self: Any, notification_ids: list[int]) -> None:
    """Send what a transaction recorded, in one transaction. A notification
    whose mail fails is recorded and goes on alone as `notifications.send`,
    with its retries and backoff; the others are not held up. If the batch
    fails as a whole (the database), it is retried; a redelivered batch sends
    only what is still unsent."""
    try:
        outcome = services.notifications_send(notification_ids)
    except Exception as exc:
        raise self.retry(exc=exc, countdown=min(60, 2**self.request.retries)) from exc
    for notification_id, error in outcome.failed.items():
        services.notification_send_failed(notification_id=notification_id, error=repr(error))
        send_notification.apply_async((notification_id,), countdown=1)


@shared_task(
    name="notifications.send",
    bind=True,
    acks_late=True,
    ignore_result=True,
    max_retries=8,
)
def send_notification(self: Any, notification_id: int) -> None:
    # The record already exists; a failed send is retried with backoff and can
    # never create a second record.
    try:
        services.notification_send(notification_id=notification_id)
    except Exception as exc:
        services.notification_send_failed(notification_id=notification_id, error=repr(exc))
        raise self.retry(exc=exc, countdown=min(60, 2**self.request.retries)) from exc
