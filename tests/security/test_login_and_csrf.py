"""The admin and Flower require login; session-authenticated writes need the
CSRF token (token-authenticated API calls carry no ambient credential and
need none)."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from ..api.conftest import World
from ..support import ROOT, wait_for

pytestmark = pytest.mark.security

PASSWORD = "pw-for-tests-only"  # tests/factories.py sets it on every user


# -- admin ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/admin/",
        "/admin/orders/order/",
        "/admin/eventing/storedevent/",
        "/admin/eventing/deadletter/",
        "/admin/auth/user/",
    ],
)
def test_admin_pages_send_anonymous_and_customers_to_the_login(world: World, path: str) -> None:
    anonymous = Client().get(path)
    customer = Client()
    customer.force_login(world.customer_a)
    as_customer = customer.get(path)
    staff = Client()
    staff.force_login(world.staff)

    for response in (anonymous, as_customer):
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
    assert staff.get(path).status_code in (200, 403)  # 403: a staff user without that right


def test_admin_login_needs_the_right_password(world: World) -> None:
    client = Client()

    wrong = client.post("/admin/login/", {"username": "staff", "password": "wrong"})
    assert wrong.status_code == 200 and "correct username and password" in wrong.text
    assert client.get("/admin/").status_code == 302

    assert client.post("/admin/login/", {"username": "staff", "password": PASSWORD}).status_code
    assert client.get("/admin/").status_code == 200


# -- CSRF -----------------------------------------------------------------------------


def _csrf_client(world: World, who: str) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(getattr(world, who))
    return client


def _csrf_token(client: Client) -> str:
    client.get("/admin/login/")  # any form page sets the cookie
    return client.cookies[settings.CSRF_COOKIE_NAME].value


# (who, method path, JSON body): the unsafe session endpoints of the API
API_WRITES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("customer_a", "/api/orders/", {"lines": [{"sku": "SKU-A", "quantity": 1}]}),
    ("customer_a", "/api/orders/{order}/cancel/", {}),
    ("staff", "/api/orders/{order}/ship/", None),
    ("staff", "/api/inventory/items/", {"sku": "SKU-X", "name": "X", "unit_price": "1.00"}),
    ("staff", "/api/inventory/items/{sku}/receive/", {"quantity": 1}),
]


@pytest.mark.parametrize(("who", "path", "body"), API_WRITES)
def test_session_api_writes_without_the_csrf_token_are_refused(
    world: World, who: str, path: str, body: dict[str, Any] | None
) -> None:
    client = _csrf_client(world, who)
    url = path.format(order=world.order_id, sku=world.sku)

    response = client.post(url, body or {}, content_type="application/json")

    assert response.status_code == 403, response.content[:300]
    assert "CSRF" in response.json()["detail"]


def test_session_api_write_with_the_csrf_token_goes_through(world: World) -> None:
    client = _csrf_client(world, "customer_a")
    token = _csrf_token(client)

    response = client.post(
        "/api/orders/",
        {"lines": [{"sku": "SKU-A", "quantity": 1}]},
        content_type="application/json",
        HTTP_X_CSRFTOKEN=token,
    )

    assert response.status_code == 201, response.content[:300]


def test_token_authenticated_writes_need_no_csrf_token(world: World) -> None:
    token = Token.objects.create(user=world.customer_a).key
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")

    response = client.post(
        "/api/orders/", {"lines": [{"sku": "SKU-A", "quantity": 1}]}, format="json"
    )

    assert response.status_code == 201


@pytest.mark.parametrize("path", ["/admin/login/", "/api-auth/login/"])
def test_login_forms_enforce_csrf(world: World, path: str) -> None:
    client = Client(enforce_csrf_checks=True)

    response = client.post(path, {"username": "staff", "password": PASSWORD})

    assert response.status_code == 403
    assert "_auth_user_id" not in client.session


def test_admin_actions_enforce_csrf(world: World) -> None:
    client = _csrf_client(world, "staff")
    form = {"action": "delete_selected", "_selected_action": [str(world.order_id)]}

    refused = client.post("/admin/orders/order/", form)

    assert refused.status_code == 403


# -- Flower ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(url: str, auth: tuple[str, str] | None = None) -> int | None:
    request = urllib.request.Request(url)  # noqa: S310 - http://127.0.0.1 only
    if auth:
        encoded = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {encoded}")
    try:
        with urllib.request.urlopen(request, timeout=3) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[tuple[str, tuple[str, str]]]:
    """`celery flower` with basic auth, as the Procfile starts it."""
    port = _free_port()
    user = ("ops", "flower-test-password")
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--basic-auth={user[0]}:{user[1]}",
        ],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.test_settings"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: _status(url) is not None, timeout=40, interval=0.3, what="Flower")
        yield url, user
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.mark.timeout(90)
def test_flower_requires_its_basic_auth(flower: tuple[str, tuple[str, str]]) -> None:
    url, (user, password) = flower

    assert _status(url) == 401
    assert _status(url, (user, "wrong")) == 401
    assert _status(f"{url}api/workers") == 401
    assert _status(f"{url}tasks") == 401
    assert _status(url, (user, password)) == 200
