"""Request bodies past the limits are refused before they do any work.

DATA_UPLOAD_MAX_MEMORY_SIZE (1 MiB by default, settings.py) caps a body;
Django refuses a larger one with 400 from its Content-Length, before reading
it. JSON nested deeper than the parser can recurse is a 400 too (it was a 500:
RecursionError escaped DRF's JSONParser), and an order's lines are capped by
the service.
"""

from __future__ import annotations

import json
import logging

import pytest
from django.conf import settings
from django.test import Client
from rest_framework.test import APIClient

from eventing.models import StoredEvent
from orders.models import Order
from orders.services import MAX_LINES

from ..api.conftest import World

pytestmark = pytest.mark.hostile


def _orders_and_events() -> tuple[int, int]:
    return Order.objects.count(), StoredEvent.objects.count()


def test_the_limit_is_set_and_small() -> None:
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE == 1024 * 1024


def test_an_oversized_json_body_is_refused_unread(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    before = _orders_and_events()
    line = {"sku": world.sku, "quantity": 1}
    body = json.dumps({"lines": [line] * 40_000}).encode()  # ~1.2 MB
    assert len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    response = world.client("customer_a").generic(
        "POST", "/api/orders/", body, content_type="application/json"
    )

    assert response.status_code == 400
    assert _orders_and_events() == before
    assert any(r.name == "django.security.RequestDataTooBig" for r in caplog.records)


def test_an_oversized_form_body_is_refused(world: World) -> None:
    body = b"username=" + b"a" * (2 * 1024 * 1024) + b"&password=x"

    response = APIClient().generic(
        "POST", "/api/auth/token/", body, content_type="application/x-www-form-urlencoded"
    )

    assert response.status_code == 400


def test_too_many_form_fields_are_refused(world: World) -> None:
    fields = "&".join(f"f{n}=1" for n in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1))

    response = Client().generic(
        "POST", "/admin/login/", fields, content_type="application/x-www-form-urlencoded"
    )

    assert response.status_code == 400


@pytest.mark.parametrize("depth", [100_000, 200_000])
def test_deeply_nested_json_is_a_400_not_a_500(
    world: World, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    before = _orders_and_events()
    body = b'{"lines": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(body) < settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    with caplog.at_level(logging.ERROR):
        response = world.client("customer_a").generic(
            "POST", "/api/orders/", body, content_type="application/json"
        )

    assert response.status_code == 400, response.content[:300]
    assert "nested too deeply" in response.json()["detail"]
    assert not [r for r in caplog.records if r.name == "django.request" and "500" in r.msg]
    assert _orders_and_events() == before


def test_more_lines_than_an_order_takes_is_a_field_error(world: World) -> None:
    lines = [{"sku": f"SKU-{n}", "quantity": 1} for n in range(MAX_LINES + 1)]

    response = world.client("customer_a").post("/api/orders/", {"lines": lines}, format="json")

    assert response.status_code == 400
    assert "lines" in response.json()
