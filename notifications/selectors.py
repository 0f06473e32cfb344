"""Notification reads: the inbox is its own read model (`Notification`)."""

from __future__ import annotations

import uuid

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Q, QuerySet

from .models import Notification

# The consumer that records notifications.
INBOX_CONSUMER = "notifications"


def inbox_for(
    *, user: AbstractBaseUser | AnonymousUser, order_id: uuid.UUID | None = None
) -> QuerySet[Notification]:
    """A customer's own notifications; staff also see the staff notices
    (low stock, `customer` null), but never other customers' messages."""
    audience = Q(customer_id=user.pk)
    if user.is_staff:
        audience |= Q(customer__isnull=True)
    qs = Notification.objects.filter(audience)
    if order_id is not None:
        qs = qs.filter(order_id=order_id)
    return qs.order_by("-created_at", "-pk")
