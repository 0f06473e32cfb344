"""Fixtures for the API tests.

Most API tests check requests, permissions and validation, not the event flow,
so they run in one rolled-back transaction without the worker: `drain()` hands
the stored events to the real consumer runtime in this process (the same
`process_message` the worker runs), in position order, until nothing new is
emitted. Tests of the flow itself use the `live` fixture and the real worker.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import LazySettings
from rest_framework.test import APIClient

from eventing.consumers import process_message
from eventing.consumers import registry as consumer_registry
from eventing.models import StoredEvent
from orders.services import order_place

from ..factories import UserFactory, api_client_for, stock_item


def drain() -> int:
    """Apply every stored event to its subscribers here, in order; returns
    how many deliveries were made. After commit hooks (relay wake-ups,
    emails) never run: the test transaction is rolled back, not committed."""
    delivered = 0
    last = 0
    while True:
        rows = list(StoredEvent.objects.filter(position__gt=last).order_by("position"))
        if not rows:
            return delivered
        for row in rows:
            for consumer in consumer_registry.subscribers_of(row.event_type):
                process_message(consumer, row.envelope())
                delivered += 1
            last = row.position


@dataclasses.dataclass
class World:
    """Customer A with a confirmed order, customer B with none, and staff."""

    customer_a: Any
    customer_b: Any
    staff: Any
    sku: str
    order_id: uuid.UUID

    def client(self, who: str) -> APIClient:
        if who == "anonymous":
            return APIClient()
        return api_client_for(getattr(self, who))


@pytest.fixture
def world(db: None) -> World:
    # threshold 8 on 10: A's order of 3 drops availability below it (StockLow,
    # a staff notice).
    stock_item("SKU-A", on_hand=10, threshold=8)
    drain()
    customer_a = UserFactory(username="customer_a")
    order = order_place(customer_id=customer_a.pk, lines=[{"sku": "SKU-A", "quantity": 3}])
    drain()
    return World(
        customer_a=customer_a,
        customer_b=UserFactory(username="customer_b"),
        staff=UserFactory(username="staff", is_staff=True),
        sku="SKU-A",
        order_id=order.pk,
    )


@pytest.fixture
def short_consistency_wait(settings: LazySettings) -> Iterator[float]:
    """A short bounded wait, for tests that run it out."""
    yield _set_consistency_wait(settings, 0.2)


@pytest.fixture
def long_consistency_wait(settings: LazySettings) -> Iterator[float]:
    """A wait far longer than any request takes, for tests that show a query
    does not wait at all (elapsed well under it, however loaded the machine)."""
    yield _set_consistency_wait(settings, 5.0)


def _set_consistency_wait(settings: LazySettings, seconds: float) -> float:
    settings.EVENTING = {**settings.EVENTING, "CONSISTENCY_WAIT_SECONDS": seconds}
    return seconds
