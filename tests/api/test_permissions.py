"""Who may call what: every endpoint x {anonymous, customer A, customer B, staff}.

Customer A owns the one order; B owns none. Another customer's order answers
404 (indistinguishable from a missing one), a staff endpoint answers 403 to a
customer, and anything but the public endpoints answers 401 to an anonymous
caller.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import URLResolver, get_resolver, resolve

from .conftest import World, drain

CALLERS = ("anonymous", "customer_a", "customer_b", "staff")

# (method, path, body, expected status per caller in CALLERS order).
# "{order}" is A's order id and "{sku}" the stocked item.
MATRIX: list[tuple[str, str, dict[str, Any] | None, tuple[int, int, int, int]]] = [
    ("GET", "/healthz", None, (200, 200, 200, 200)),
    ("GET", "/readyz", None, (200, 200, 200, 200)),
    ("GET", "/api/schema/", None, (200, 200, 200, 200)),
    ("GET", "/api/docs/", None, (200, 200, 200, 200)),
    ("GET", "/api/", None, (401, 200, 200, 200)),
    ("GET", "/api/inventory/items/", None, (401, 200, 200, 200)),
    ("GET", "/api/inventory/items/{sku}/", None, (401, 200, 200, 200)),
    (
        "POST",
        "/api/inventory/items/",
        {"sku": "SKU-NEW", "name": "New", "unit_price": "1.00", "on_hand": 5},
        (401, 403, 403, 201),
    ),
    ("POST", "/api/inventory/items/{sku}/receive/", {"quantity": 5}, (401, 403, 403, 200)),
    ("GET", "/api/orders/", None, (401, 200, 200, 200)),
    (
        "POST",
        "/api/orders/",
        {"lines": [{"sku": "SKU-A", "quantity": 1}]},
        (401, 201, 201, 201),
    ),
    ("GET", "/api/orders/{order}/", None, (401, 200, 404, 200)),
    ("POST", "/api/orders/{order}/cancel/", {}, (401, 200, 404, 200)),
    ("POST", "/api/orders/{order}/ship/", None, (401, 403, 403, 200)),
    ("GET", "/api/notifications/", None, (401, 200, 200, 200)),
    ("GET", "/api/events/", None, (401, 403, 403, 200)),
    ("GET", "/api/events/?aggregate_id={order}", None, (401, 403, 403, 200)),
    ("GET", "/api/eventing/status/", None, (401, 403, 403, 200)),
]

CASES = [
    pytest.param(method, path, body, caller, expected[i], id=f"{method} {path} as {caller}")
    for method, path, body, expected in MATRIX
    for i, caller in enumerate(CALLERS)
]


@pytest.mark.parametrize(("method", "path", "body", "caller", "expected"), CASES)
def test_permission_matrix(
    world: World,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    caller: str,
    expected: int,
) -> None:
    url = path.format(order=world.order_id, sku=world.sku)
    client = world.client(caller)

    if method == "GET":
        response = client.get(url)
    else:
        response = client.post(url, body, format="json")

    assert response.status_code == expected, response.content[:500]
    if expected == 401:
        # DRF names the scheme so a client knows how to authenticate.
        assert response["WWW-Authenticate"] == "Token"


def test_the_matrix_covers_every_api_route(world: World) -> None:
    """A new endpoint must get a row in the matrix above."""

    def walk(patterns: list[Any], prefix: str = "") -> list[str]:
        routes = []
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                routes += walk(pattern.url_patterns, prefix + str(pattern.pattern))
            else:
                routes.append(prefix + str(pattern.pattern))
        return routes

    every_route = {
        route.replace("api/^", "api/")  # as ResolverMatch.route spells it
        for route in walk(get_resolver().url_patterns)
        if route.startswith("api/") and "format" not in route  # no ".json" twins
    }
    in_matrix = {
        resolve(path.format(order=world.order_id, sku=world.sku).split("?")[0]).route
        for _, path, _, _ in MATRIX
    }
    tested_elsewhere = {"api/auth/token/"}  # test_auth.py

    assert every_route - tested_elsewhere == {r for r in in_matrix if r.startswith("api/")}


def test_customer_b_sees_nothing_of_customer_a(world: World) -> None:
    b = world.client("customer_b")

    assert b.get("/api/orders/").json()["results"] == []
    assert b.get("/api/notifications/").json()["results"] == []
    assert b.get(f"/api/orders/{world.order_id}/").status_code == 404
    assert b.post(f"/api/orders/{world.order_id}/cancel/").status_code == 404
    assert b.get(f"/api/events/?aggregate_id={world.order_id}").status_code == 403


def test_customer_a_sees_their_order_and_inbox(world: World) -> None:
    a = world.client("customer_a")

    orders = a.get("/api/orders/").json()
    assert [o["id"] for o in orders["results"]] == [str(world.order_id)]
    assert orders["results"][0]["status"] == "CONFIRMED"
    inbox = a.get("/api/notifications/").json()["results"]
    assert [(n["kind"], n["audience"], n["order_id"]) for n in inbox] == [
        ("order_confirmed", "customer", str(world.order_id))
    ]


def test_staff_see_every_order_and_staff_notices_but_not_customer_inboxes(world: World) -> None:
    world.client("customer_b").post(
        "/api/orders/", {"lines": [{"sku": "SKU-A", "quantity": 1}]}, format="json"
    )
    drain()
    staff = world.client("staff")

    assert staff.get("/api/orders/").json()["count"] == 2
    inbox = staff.get("/api/notifications/").json()["results"]
    assert [(n["kind"], n["audience"]) for n in inbox] == [("stock_low", "staff")]


@pytest.mark.parametrize(
    "path",
    [
        "/api/",
        "/api/orders/",
        "/api/orders/{order}/",
        "/api/inventory/items/",
        "/api/inventory/items/{sku}/",
        "/api/notifications/",
        "/api/events/",
        "/api/eventing/status/",
    ],
)
def test_browsable_api_renders_for_staff(world: World, path: str) -> None:
    url = path.format(order=world.order_id, sku=world.sku)

    response = world.client("staff").get(url, HTTP_ACCEPT="text/html")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
