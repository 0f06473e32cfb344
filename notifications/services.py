"""Recording and sending notifications."""

from __future__ import annotations

import uuid

from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from eventing import context, store
from eventing.consumers import EventMeta, after_commit
from eventing.models import StoredEvent

from . import events
from .models import Notification


def notification_record(
    *,
    meta: EventMeta,
    kind: str,
    customer_id: int | None,
    subject: str,
    body: str,
    order_id: str | None = None,
) -> Notification:
    """Record the notification (idempotent per source event) and send it
    after the handler's transaction commits; replay records without sending."""
    notification = Notification(
        source_event_id=uuid.UUID(meta.event_id),
        customer_id=customer_id,
        kind=kind,
        subject=subject,
        body=body,
        order_id=order_id,
        aggregate_id=meta.aggregate_id,
        # The event's time, not now(): a replay rebuilds the same row.
        created_at=meta.time,
        # Replay rebuilds the inbox but never sends: what it records counts
        # as delivered by the live path.
        sent_at=meta.time if meta.replaying else None,
    )
    if not _insert_unless_recorded(notification):
        return Notification.objects.get(source_event_id=notification.source_event_id)
    from .tasks import send_notification

    after_commit(lambda: send_notification.delay(notification.pk))
    return notification


_INSERT_FIELDS = [f for f in Notification._meta.concrete_fields if not f.primary_key]
_INSERT_SQL = (
    f"INSERT INTO {Notification._meta.db_table} "  # noqa: S608 - names from the model
    f"({', '.join(connection.ops.quote_name(f.column) for f in _INSERT_FIELDS)}) "
    f"VALUES ({', '.join(['%s'] * len(_INSERT_FIELDS))}) "
    "ON CONFLICT (source_event_id) DO NOTHING RETURNING id"
)


def _insert_unless_recorded(notification: Notification) -> bool:
    """Insert the row unless its source event already has one; returns
    whether it did. One round trip, where get_or_create takes four (a
    SELECT, then a savepoint around the INSERT): the checkpoint already
    skips redelivered events, so the row is nearly always new."""
    values = [
        f.get_db_prep_save(f.pre_save(notification, add=True), connection) for f in _INSERT_FIELDS
    ]
    with connection.cursor() as cursor:
        cursor.execute(_INSERT_SQL, values)
        row = cursor.fetchone()
    if row is None:
        return False
    notification.pk = row[0]
    notification._state.adding = False
    return True


def notification_send(*, notification_id: int) -> bool:
    """Send once: the row lock and `sent_at` make a redelivered send a no-op.
    Returns whether this call sent it.

    The mail leaves inside the transaction that marks it sent and appends
    CustomerNotified: if the mail fails, nothing is marked or appended and the
    task retries. A crash between the mail and the commit sends it again on
    the next try: email is at-least-once, the inbox record exactly once.
    """
    with transaction.atomic():
        notification = Notification.objects.select_for_update().get(pk=notification_id)
        if notification.sent_at is not None:
            return False
        if notification.order_id is not None:
            _append_customer_notified(notification)
        recipients = _recipients(notification)
        if recipients:
            send_mail(notification.subject, notification.body, None, recipients)
        notification.sent_at = timezone.now()
        notification.send_attempts += 1
        notification.last_error = ""
        notification.save(update_fields=["sent_at", "send_attempts", "last_error"])
    return True


def notification_send_failed(*, notification_id: int, error: str) -> None:
    """Record a failed attempt (outside the rolled-back send transaction)."""
    Notification.objects.filter(pk=notification_id).update(
        send_attempts=F("send_attempts") + 1, last_error=error[:2000]
    )


# The order's notification stream locked, then its head version and the
# source event's correlation id and chain depth (NULL if it is not stored).
_LOCK_STREAM_SQL = f"""
SELECT pg_advisory_xact_lock(hashtext(%s));
SELECT
    COALESCE((SELECT max(version) FROM {StoredEvent._meta.db_table}
              WHERE aggregate_type = %s AND aggregate_id = %s), 0),
    source.correlation_id,
    source.chain_depth
FROM (SELECT 1) AS one
LEFT JOIN {StoredEvent._meta.db_table} AS source ON source.event_id = %s
"""  # noqa: S608 - the table name comes from the model


def _append_customer_notified(notification: Notification) -> None:
    """Caller holds the transaction. The order's notification stream has one
    writer at a time: an advisory lock on the order id serialises them, so the
    head read here is the version the append expects."""
    order_id = str(notification.order_id)
    with connection.cursor() as cursor:
        # One round trip, two statements: the head is read in a snapshot
        # taken once the lock is held, so it sees the previous holder's append.
        cursor.execute(
            _LOCK_STREAM_SQL,
            [
                f"notify:{order_id}",
                events.ORDER_NOTIFICATIONS,
                order_id,
                notification.source_event_id,
            ],
        )
        head, correlation_id, source_depth = cursor.fetchone()
    with context.scope(
        correlation_id=correlation_id,
        causation_id=str(notification.source_event_id),
        actor="notifications",
        chain_depth=source_depth + 1 if source_depth is not None else 0,
    ):
        store.append(
            aggregate_type=events.ORDER_NOTIFICATIONS,
            aggregate_id=order_id,
            expected_version=head,
            events=[
                events.CustomerNotified(
                    order_id=order_id,
                    customer_id=notification.customer_id or 0,
                    kind=notification.kind,
                    notification_event_id=str(notification.source_event_id),
                )
            ],
        )


def notifications_unsent(*, older_than_seconds: float) -> list[int]:
    """Recorded but not sent: the after-commit hook was lost (a crash right
    after commit) or every retry failed. The sweep sends these."""
    cutoff = timezone.now() - timezone.timedelta(seconds=older_than_seconds)
    return list(
        Notification.objects.filter(sent_at__isnull=True, recorded_at__lt=cutoff)
        .order_by("pk")
        .values_list("pk", flat=True)[:500]
    )


def _recipients(notification: Notification) -> list[str]:
    user_model = get_user_model()
    if notification.customer_id is None:
        return list(
            user_model.objects.filter(is_staff=True, is_active=True)
            .exclude(email="")
            .values_list("email", flat=True)
        )
    email = user_model.objects.filter(pk=notification.customer_id).values_list("email", flat=True)
    return [e for e in email if e]
