"""Order reads. Queries are answered from the `OrderSummary` read model (CQRS);
the write model only decides who may see an order and how far the read model
lags behind it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from eventing.api import CATCHING_UP, CURRENT, ConsistencyToken
from eventing.models import Checkpoint

from .events import ORDER, OrderRejected
from .models import Order, OrderSummary

# The consumer whose projection `OrderSummary` is.
SUMMARY_CONSUMER = "orders"

User = AbstractBaseUser | AnonymousUser


def orders_visible_to(user: User) -> QuerySet[Order]:
    """Another customer's order is indistinguishable from a missing one."""
    qs = Order.objects.all()
    if not user.is_staff:
        qs = qs.filter(customer_id=user.pk)
    return qs


def order_get_for(*, user: User, order_id: str | uuid.UUID) -> Order | None:
    return orders_visible_to(user).filter(pk=order_id).first()


def order_summaries_for(*, user: User, status: str | None = None) -> QuerySet[OrderSummary]:
    """The caller's summaries (staff: everyone's), newest first. A row that
    only inventory's events have touched yet (the order's own lane lags) has
    no customer or status: it is not listed until `OrderPlaced` is applied."""
    qs = OrderSummary.objects.exclude(status="")
    if not user.is_staff:
        qs = qs.filter(customer_id=user.pk)
    if status:
        qs = qs.filter(status=status)
    return qs.order_by("-placed_at", "order_id")


@dataclasses.dataclass(frozen=True)
class OrderView:
    """One order as a customer sees it. `consistency` is "current" when the
    summary reflects every command applied to the order (its own stream up
    to the write model's version), else "catching-up"; `consistency_token`
    names that latest write, for a query to wait on."""

    id: uuid.UUID
    status: str
    lines: list[dict[str, Any]]
    total: Decimal
    rejection_reasons: list[dict[str, Any]]
    created_at: dt.datetime
    updated_at: dt.datetime
    timeline: list[dict[str, Any]]
    consistency: str
    consistency_token: str


def _rejection_reasons(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for entry in reversed(timeline):
        if entry.get("type") == OrderRejected.name:
            return list(entry.get("detail", {}).get("reasons", []))
    return []


def order_view(*, order: Order) -> OrderView:
    """Read the order's summary. Read order: write model (already loaded),
    then the checkpoint, then the summary, so the summary is at least as new
    as the checkpoint it is judged by (each statement sees the latest commits).

    Until `OrderPlaced` is applied the summary does not exist (or holds only
    inventory's entries): answer from the write model with an empty timeline
    and "catching-up" rather than 404 for an order the client was just told
    exists (201 + Location)."""
    applied = (
        Checkpoint.objects.filter(
            consumer=SUMMARY_CONSUMER, aggregate_type=ORDER, aggregate_id=str(order.pk)
        )
        .values_list("version", flat=True)
        .first()
        or 0
    )
    summary = OrderSummary.objects.filter(order_id=order.pk).exclude(status="").first()
    token = str(ConsistencyToken.for_aggregate(order))
    if summary is None:
        return OrderView(
            id=order.pk,
            status=order.status,
            lines=order.lines,
            total=order.total,
            rejection_reasons=order.rejection_reasons,
            created_at=order.created_at,
            updated_at=order.updated_at,
            timeline=[],
            consistency=CATCHING_UP,
            consistency_token=token,
        )
    return OrderView(
        id=summary.order_id,
        status=summary.status,
        lines=summary.lines,
        total=summary.total,
        rejection_reasons=_rejection_reasons(summary.timeline),
        created_at=summary.placed_at,
        updated_at=summary.updated_at,
        timeline=summary.timeline,
        consistency=CURRENT if applied >= order.version else CATCHING_UP,
        consistency_token=token,
    )
