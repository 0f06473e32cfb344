"""Sending a recorded notification: retried on failure, never duplicated."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from django.core import mail
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
