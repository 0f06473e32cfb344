"""Passwords and tokens never appear in events, logs or error messages.

A customer with a distinctive password signs in every way the platform
offers (token endpoint, DRF session login, admin login), with right and wrong
credentials, uses the token on the API (good and bad), places an order that
runs through every consumer; then every stored row the flow produced, every
log record and every response body is searched for the password and the token.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core import serializers
from django.test import Client
from rest_framework.test import APIClient

from eventing.models import DeadLetter, OutboxMessage, StoredEvent
from notifications.models import Notification
from orders.models import Order, OrderSummary

from ..api.conftest import drain
from ..factories import stock_item
from ..support import Worker, wait_for

pytestmark = pytest.mark.security


def _rows_as_text() -> str:
    models = (StoredEvent, OutboxMessage, DeadLetter, Notification, Order, OrderSummary)
    return "\n".join(serializers.serialize("json", m.objects.all()) for m in models)


def _log_text(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    parts = []
    for record in records:
        parts.append(formatter.format(record))
        parts.append(json.dumps(record.__dict__, default=str))
    return "\n".join(parts)


def test_credentials_leak_into_no_event_row_log_or_response(
    db: None, caplog: pytest.LogCaptureFixture
) -> None:
    password = f"Pw-{secrets.token_urlsafe(16)}"
    user = get_user_model().objects.create_user(
        "leaky", email="leaky@example.com", password=password
    )
    caplog.set_level(logging.DEBUG)  # every logger, Django's and ours
    stock_item("SKU-L", on_hand=10)
    drain()
    bodies: list[str] = []

    def keep(response: Any) -> Any:
        bodies.append(response.content.decode(errors="replace"))
        bodies.append(json.dumps(dict(response.items())))
        return response

    anonymous = APIClient()
    keep(anonymous.post("/api/auth/token/", {"username": "leaky", "password": password[::-1]}))
    keep(anonymous.post("/api/auth/token/", {"username": "nobody", "password": password}))
    token = keep(
        anonymous.post("/api/auth/token/", {"username": "leaky", "password": password})
    ).json()["token"]
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION=f"Token {token[::-1]}")
    assert keep(wrong.get("/api/orders/")).status_code == 401
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    placed = keep(
        api.post("/api/orders/", {"lines": [{"sku": "SKU-L", "quantity": 1}]}, format="json")
    )
    assert placed.status_code == 201
    keep(api.post("/api/orders/", {"lines": [{"sku": "SKU-L", "quantity": "x"}]}, format="json"))
    keep(api.post("/api/orders/", b"{broken", content_type="application/json"))
    drain()
    keep(api.get(f"/api/orders/{placed.json()['id']}/"))
    keep(api.get("/api/notifications/"))

    session = Client()
    keep(session.post("/api-auth/login/", {"username": "leaky", "password": password[::-1]}))
    keep(session.post("/api-auth/login/", {"username": "leaky", "password": password}))
    keep(session.post("/admin/login/", {"username": "leaky", "password": password}))
    keep(session.post("/admin/login/", {"username": "leaky", "password": password + "x"}))
    assert user.notifications.exists()

    for where, text in (
        ("stored rows", _rows_as_text()),
        ("log records", _log_text(caplog.records)),
        ("responses", "\n".join(bodies[:4] + bodies[6:])),  # all but the token's own answer
    ):
        assert password not in text, f"the password leaks into {where}"
        assert password[::-1] not in text, f"a wrong password leaks into {where}"
        assert token not in text, f"the token leaks into {where}"
        assert token[::-1] not in text, f"a wrong token leaks into {where}"
    assert caplog.records, "the flow logged nothing: the scan would prove nothing"


@pytest.mark.live
def test_credentials_leak_into_no_worker_log(live: Worker) -> None:
    """The same on the real worker: what it logs about the events of an order
    placed with a token holds neither the token nor the password."""
    password = f"Pw-{secrets.token_urlsafe(16)}"
    user = get_user_model().objects.create_user(
        "leaky-live", email="leaky-live@example.com", password=password
    )
    stock_item("SKU-LL", on_hand=10)
    anonymous = APIClient()
    token = anonymous.post(
        "/api/auth/token/", {"username": "leaky-live", "password": password}
    ).json()["token"]
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    wait_for(
        lambda: (
            api.post(
                "/api/orders/", {"lines": [{"sku": "SKU-LL", "quantity": 1}]}, format="json"
            ).status_code
            == 201
        ),
        what="the catalog to know SKU-LL",
    )
    wait_for(lambda: user.notifications.exists(), what="the order's notification")

    log = Path(live.log_path).read_text(errors="replace")
    assert "SKU-LL" in log or "orders.handle_event" in log
    assert password not in log
    assert token not in log
