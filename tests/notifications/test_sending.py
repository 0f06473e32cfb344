"""Sending a recorded notification: retried on failure, never duplicated."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import pytest
from django.core import mail
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from eventing.consumers import EventMeta
from eventing.models import StoredEvent
from notifications import services
from notifications.models import Notification

from ..factories import UserFactory


def _meta(order_id: str) -> EventMeta:
    return EventMeta(
        event_id=str(uuid.uuid4()),
        event_type="orders.OrderConfirmed",
        position=1,
        aggregate_type="orders.Order",
        aggregate_id=order_id,
        version=2,
        time=timezone.now() - dt.timedelta(minutes=5),
        correlation_id="c-1",
        causation_id="",
        actor="",
        consumer="notifications",
    )


def test_a_failed_send_is_recorded_retried_and_sent_once(
    db: None, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    order_id = str(uuid.uuid4())
    customer = UserFactory()
    meta = _meta(order_id)
    notification = services.notification_record(
        meta=meta,
        kind="order_confirmed",
        customer_id=customer.pk,
        subject="Your order is confirmed",
        body=f"Order {order_id}",
        order_id=order_id,
    )
    # Redelivery of the same event records nothing new.
    assert (
        services.notification_record(
            meta=meta,
            kind="order_confirmed",
            customer_id=customer.pk,
            subject="x",
            body="y",
            order_id=order_id,
        ).pk
        == notification.pk
    )

    def smtp_down(*args: Any, **kwargs: Any) -> int:
        raise ConnectionRefusedError("SMTP server down")

    monkeypatch.setattr(services, "send_mail", smtp_down)
    with pytest.raises(ConnectionRefusedError):
        services.notification_send(notification_id=notification.pk)
    services.notification_send_failed(notification_id=notification.pk, error="SMTP server down")

    notification.refresh_from_db()
    assert notification.sent_at is None
    assert (notification.send_attempts, notification.last_error) == (1, "SMTP server down")
    # Nothing of the failed attempt was kept: no CustomerNotified event.
    assert not StoredEvent.objects.filter(event_type="notifications.CustomerNotified").exists()
    # Unsent and older than the sweep's threshold once its recorded_at is old.
    Notification.objects.filter(pk=notification.pk).update(
        recorded_at=timezone.now() - dt.timedelta(minutes=2)
    )
    assert services.notifications_unsent(older_than_seconds=30) == [notification.pk]

    monkeypatch.undo()
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert services.notification_send(notification_id=notification.pk) is True
    assert services.notification_send(notification_id=notification.pk) is False  # redelivered

    assert len(mail.outbox) == 1 and mail.outbox[0].to == [customer.email]
    assert Notification.objects.filter(order_id=order_id).count() == 1
    notified = StoredEvent.objects.get(event_type="notifications.CustomerNotified")
    assert (notified.aggregate_id, notified.payload["kind"]) == (order_id, "order_confirmed")
    assert services.notifications_unsent(older_than_seconds=30) == []


def test_recording_the_same_event_twice_keeps_one_row_and_sends_once(
    db: None, django_capture_on_commit_callbacks: Any
) -> None:
    order_id = str(uuid.uuid4())
    customer = UserFactory()
    meta = _meta(order_id)
    record = {
        "meta": meta,
        "kind": "order_confirmed",
        "customer_id": customer.pk,
        "subject": "Your order is confirmed",
        "order_id": order_id,
    }
    with django_capture_on_commit_callbacks() as first_callbacks:
        first = services.notification_record(**record, body="first")
    with django_capture_on_commit_callbacks() as second_callbacks:
        second = services.notification_record(**record, body="second")

    assert second.pk == first.pk
    [row] = Notification.objects.filter(source_event_id=meta.event_id)
    assert (row.pk, row.body, row.created_at, row.sent_at) == (first.pk, "first", meta.time, None)
    assert row.recorded_at is not None
    assert (len(first_callbacks), len(second_callbacks)) == (1, 0)


def test_one_transaction_sends_its_notifications_in_one_go_and_a_failed_mail_keeps_nothing(
    db: None, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """What one transaction (a consumer's batch) records leaves in one
    message; the send handles them together: a mail that fails is reported
    and keeps nothing (no mark, no event), the others are sent and get their
    CustomerNotified, two of one order one after the other in its stream."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    customers = [UserFactory(), UserFactory(), UserFactory()]
    orders = [str(uuid.uuid4()) for _ in customers]
    recorded = []
    # Four notifications in one transaction: the first order twice (confirmed, shipped).
    with transaction.atomic():
        for customer, order_id, kind in [
            (customers[0], orders[0], "order_confirmed"),
            (customers[1], orders[1], "order_confirmed"),
            (customers[2], orders[2], "order_confirmed"),
            (customers[0], orders[0], "order_shipped"),
        ]:
            recorded.append(
                services.notification_record(
                    meta=_meta(order_id),
                    kind=kind,
                    customer_id=customer.pk,
                    subject=kind,
                    body=f"Order {order_id}",
                    order_id=order_id,
                )
            )
        callbacks = [func for _, func, _ in connection.run_on_commit]
    [send] = callbacks
    assert send.notification_ids == [n.pk for n in recorded]

    real_send_mail = services.send_mail

    def smtp_refuses_the_second(subject: str, body: str, sender: Any, to: list[str]) -> int:
        if to == [customers[1].email]:
            raise ConnectionRefusedError("mailbox unavailable")
        return real_send_mail(subject, body, sender, to)

    monkeypatch.setattr(services, "send_mail", smtp_refuses_the_second)
    with CaptureQueriesContext(connection) as captured:
        outcome = services.notifications_send(send.notification_ids)
    appends = [q for q in captured.captured_queries if "EXECUTE eventing_append" in q["sql"]]
    assert len(appends) == 1, "every order's CustomerNotified in one statement"

    first, second, third, shipped = (n.pk for n in recorded)
    assert outcome.sent == [first, third, shipped]
    assert list(outcome.failed) == [second]
    assert "mailbox unavailable" in str(outcome.failed[second])
    sent = dict(Notification.objects.values_list("pk", "sent_at"))
    assert sent[second] is None and all(sent[pk] for pk in (first, third, shipped))
    assert sorted(m.to[0] for m in mail.outbox) == sorted(
        [customers[0].email, customers[2].email, customers[0].email]
    )
    notified = StoredEvent.objects.filter(event_type="notifications.CustomerNotified")
    assert sorted((e.aggregate_id, e.version, e.payload["kind"]) for e in notified) == sorted(
        [
            (orders[0], 1, "order_confirmed"),
            (orders[0], 2, "order_shipped"),
            (orders[2], 1, "order_confirmed"),
        ]
    )
    # Sent again (a redelivered batch): only the failed one is tried, and it goes now.
    monkeypatch.setattr(services, "send_mail", real_send_mail)
    again = services.notifications_send(send.notification_ids)
    assert (again.sent, again.failed) == ([second], {})
    assert notified.filter(aggregate_id=orders[1]).count() == 1


def test_a_notification_whose_event_would_be_too_deep_sends_no_mail(
    db: None, settings: Any
) -> None:
    """Its CustomerNotified would exceed MAX_CHAIN_DEPTH: that is found before
    any mail leaves, so the failure resends nothing; the others are sent."""
    from eventing import context, store
    from orders.events import OrderConfirmed

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    deep_order, fine_order = str(uuid.uuid4()), str(uuid.uuid4())
    with (
        context.scope(chain_depth=settings.EVENTING["MAX_CHAIN_DEPTH"]),
        transaction.atomic(),
    ):
        [deep_source] = store.append(
            aggregate_type="orders.Order",
            aggregate_id=deep_order,
            expected_version=0,
            events=[OrderConfirmed(order_id=deep_order, customer_id=1)],
        )
    customer = UserFactory()
    deep_meta = dataclasses.replace(_meta(deep_order), event_id=str(deep_source.event_id))
    recorded = [
        services.notification_record(
            meta=meta,
            kind="order_confirmed",
            customer_id=customer.pk,
            subject="s",
            body="b",
            order_id=order_id,
        )
        for meta, order_id in [(deep_meta, deep_order), (_meta(fine_order), fine_order)]
    ]

    outcome = services.notifications_send([n.pk for n in recorded])

    assert outcome.sent == [recorded[1].pk]
    assert "MAX_CHAIN_DEPTH" in str(outcome.failed[recorded[0].pk])
    assert len(mail.outbox) == 1, "no mail for the one whose event is refused"
    assert not StoredEvent.objects.filter(
        aggregate_id=deep_order, event_type="notifications.CustomerNotified"
    ).exists()
