"""Recording and sending notifications."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence

from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from eventing import context, store
from eventing.consumers import EventMeta, after_commit
from eventing.context import EventContext
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
    _send_after_commit(notification.pk)
    return notification


class _SendAfterCommit:
    """The notifications recorded at one savepoint level of a transaction,
    sent by one task once it commits: a consumer's batch that records fifty
    notifications sends one message, not fifty."""

    def __init__(self) -> None:
        self.notification_ids: list[int] = []

    def __call__(self) -> None:
        from .tasks import send_notifications

        send_notifications.delay(self.notification_ids)


def _send_after_commit(notification_id: int) -> None:
    # Joined to the callback registered at this very savepoint level, if any:
    # Django drops a callback with the savepoint it was registered in, so a
    # rolled-back savepoint takes exactly its own notifications with it.
    level = set(connection.savepoint_ids)
    for savepoints, func, _robust in getattr(connection, "run_on_commit", []):
        if isinstance(func, _SendAfterCommit) and savepoints == level:
            func.notification_ids.append(notification_id)
            return
    batch = _SendAfterCommit()
    batch.notification_ids.append(notification_id)
    after_commit(batch)


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
    """Send one notification (see `notifications_send`). Returns whether this
    call sent it; raises the mail's error if it failed."""
    outcome = notifications_send([notification_id])
    if notification_id in outcome.failed:
        raise outcome.failed[notification_id]
    return notification_id in outcome.sent


@dataclasses.dataclass
class SendOutcome:
    sent: list[int]  # sent by this call
    failed: dict[int, Exception]  # the mail failed: nothing of theirs was kept


def notifications_send(notification_ids: Sequence[int]) -> SendOutcome:
    """Send each of these notifications at most once: the row lock and
    `sent_at` make a redelivered send a no-op.

    One transaction for all of them, a handful of statements whatever their
    number: their rows locked, the recipients read, the order streams locked
    and their heads read; then the mails leave; last, the sent ones'
    CustomerNotified are appended (one statement for all the streams) and
    the sent ones are marked. A mail that fails keeps nothing of its own (no
    mark, no event) and is reported in `failed` for the caller to retry; the
    others go on. Email is at-least-once: a crash after a mail and before
    the commit sends it again on the next try (and every mail of the call
    with it), and the inbox record and its event stay exactly-once.
    """
    outcome = SendOutcome(sent=[], failed={})
    with transaction.atomic():
        # Rows another send holds are that send's to send (or to leave
        # unsent, for its retry or the sweep): skipped, not waited for.
        unsent = list(
            Notification.objects.select_for_update(skip_locked=True)
            .filter(pk__in=notification_ids, sent_at__isnull=True)
            .order_by("pk")
        )
        if not unsent:
            return outcome
        recipients = _recipients(unsent)
        streams = _lock_order_streams(unsent)
        appends = []
        for notification in unsent:
            to = recipients.get(notification.customer_id, [])
            about_order = notification.order_id is not None
            try:
                if about_order:
                    # What would refuse its event is found before its mail
                    # leaves: a failure after the mails resends them all.
                    event_context = _event_context(notification, streams)
                    store.check_chain_depth(event_context)
                if to:
                    send_mail(notification.subject, notification.body, None, to)
            except Exception as exc:
                outcome.failed[notification.pk] = exc
                continue
            if about_order:
                appends.append(_customer_notified(notification, streams, event_context))
            outcome.sent.append(notification.pk)
        # Every order's CustomerNotified in one statement.
        store.append_streams(appends)
        if outcome.sent:
            Notification.objects.filter(pk__in=outcome.sent).update(
                sent_at=timezone.now(), send_attempts=F("send_attempts") + 1, last_error=""
            )
    return outcome


def notification_send_failed(*, notification_id: int, error: str) -> None:
    """Record a failed attempt (outside the rolled-back send transaction)."""
    Notification.objects.filter(pk=notification_id).update(
        send_attempts=F("send_attempts") + 1, last_error=error[:2000]
    )


# The orders' notification streams locked (in key order, so two sends queue
# rather than deadlock), then, per notification, its stream's head version
# and its source event's correlation id and chain depth (NULL if it is not
# stored). Two statements: the SELECT's snapshot is taken once the locks are
# held, so it sees the previous holders' appends.
_LOCK_STREAMS_SQL = f"""
SELECT pg_advisory_xact_lock(k) FROM (
    SELECT DISTINCT hashtext('notify:' || order_id) AS k
    FROM unnest(%s::text[]) AS order_id ORDER BY 1) AS wanted;
SELECT
    n.order_id,
    n.source_event_id::text,
    COALESCE((SELECT max(version) FROM {StoredEvent._meta.db_table}
              WHERE aggregate_type = %s AND aggregate_id = n.order_id), 0),
    source.correlation_id,
    source.chain_depth
FROM unnest(%s::text[], %s::uuid[]) AS n(order_id, source_event_id)
LEFT JOIN {StoredEvent._meta.db_table} AS source ON source.event_id = n.source_event_id
"""  # noqa: S608 - the table name comes from the model


@dataclasses.dataclass
class _Stream:
    head: int
    # source event id -> (correlation id, chain depth), None if not stored
    sources: dict[str, tuple[str, int] | None]


def _lock_order_streams(notifications: list[Notification]) -> dict[str, _Stream]:
    """Caller holds the transaction. Each order's notification stream has one
    writer at a time: an advisory lock on the order id serialises them, so
    the heads read here are the versions the appends expect."""
    about_orders = [n for n in notifications if n.order_id is not None]
    if not about_orders:
        return {}
    order_ids = [str(n.order_id) for n in about_orders]
    with connection.cursor() as cursor:
        cursor.execute(
            _LOCK_STREAMS_SQL,
            [
                order_ids,
                events.ORDER_NOTIFICATIONS,
                order_ids,
                [n.source_event_id for n in about_orders],
            ],
        )
        streams: dict[str, _Stream] = {}
        for order_id, source_event_id, head, correlation_id, depth in cursor.fetchall():
            stream = streams.setdefault(order_id, _Stream(head=head, sources={}))
            stream.sources[source_event_id] = (
                (correlation_id, depth) if correlation_id is not None else None
            )
    return streams


def _customer_notified(
    notification: Notification, streams: dict[str, _Stream], event_context: EventContext
) -> store.StreamAppend:
    """The notification's CustomerNotified, next in its order's stream, whose
    lock the caller holds (`_lock_order_streams`), recording `event_context`."""
    order_id = str(notification.order_id)
    stream = streams[order_id]
    append = store.StreamAppend(
        aggregate_type=events.ORDER_NOTIFICATIONS,
        aggregate_id=order_id,
        expected_version=stream.head,
        events=[
            events.CustomerNotified(
                order_id=order_id,
                customer_id=notification.customer_id or 0,
                kind=notification.kind,
                notification_event_id=str(notification.source_event_id),
            )
        ],
        context=event_context,
    )
    stream.head += 1
    return append


def _event_context(notification: Notification, streams: dict[str, _Stream]) -> EventContext:
    """CustomerNotified follows from the notification's source event."""
    stream = streams[str(notification.order_id)]
    source = stream.sources.get(str(notification.source_event_id))
    correlation_id, source_depth = source if source is not None else (None, None)
    return dataclasses.replace(
        context.current(),
        correlation_id=correlation_id,
        causation_id=str(notification.source_event_id),
        actor="notifications",
        chain_depth=source_depth + 1 if source_depth is not None else 0,
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


def _recipients(notifications: list[Notification]) -> dict[int | None, list[str]]:
    """Customer id (None: staff) -> the addresses to send to."""
    user_model = get_user_model()
    customer_ids = {n.customer_id for n in notifications if n.customer_id is not None}
    found: dict[int | None, list[str]] = {
        pk: [email]
        for pk, email in user_model.objects.filter(pk__in=customer_ids)
        .exclude(email="")
        .values_list("pk", "email")
    }
    if any(n.customer_id is None for n in notifications):
        found[None] = list(
            user_model.objects.filter(is_staff=True, is_active=True)
            .exclude(email="")
            .values_list("email", flat=True)
        )
    return found
