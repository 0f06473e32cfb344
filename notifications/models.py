from __future__ import annotations

from django.conf import settings
from django.db import models


class Notification(models.Model):
    """One message to a customer (or to staff when `customer` is null).

    Recorded once per source event, in the handler's transaction (the unique
    `source_event_id` makes a second record impossible); sent after commit,
    and `sent_at` makes the send happen at most once.
    """

    class Kind(models.TextChoices):
        ORDER_CONFIRMED = "order_confirmed"
        ORDER_REJECTED = "order_rejected"
        ORDER_SHIPPED = "order_shipped"
        ORDER_CANCELLED = "order_cancelled"
        STOCK_LOW = "stock_low"

    source_event_id = models.UUIDField(unique=True)
    customer = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="notifications",
    )
    kind = models.CharField(max_length=32, choices=Kind.choices)
    subject = models.CharField(max_length=200)
    body = models.TextField()
    order_id = models.UUIDField(null=True, blank=True, db_index=True)
    # The id of the aggregate whose event caused this notification: lets
    # replay rebuild one aggregate's notifications alone.
    aggregate_id = models.CharField(max_length=100, db_index=True, default="")
    created_at = models.DateTimeField()
    # When this row was written (not the event's time): the unsent sweep
    # leaves fresh rows to their after-commit send.
    recorded_at = models.DateTimeField(auto_now_add=True, db_index=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    send_attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} to {self.customer_id or 'staff'}"
