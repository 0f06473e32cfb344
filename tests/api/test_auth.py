"""Token and session authentication, and the public probes."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from ..factories import UserFactory


@pytest.fixture
def alice(db: None) -> object:
    return UserFactory(username="alice")  # password: pw-for-tests-only


def test_token_for_good_credentials_authenticates_later_calls(alice: object) -> None:
    client = APIClient()

    response = client.post(
        "/api/auth/token/",
        {"username": "alice", "password": "pw-for-tests-only"},
        format="json",
    )

    assert response.status_code == 200
    token = response.json()["token"]
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/orders/").status_code == 200
    # Asking again returns the same token (DRF keeps one per user).
    again = APIClient().post(
        "/api/auth/token/", {"username": "alice", "password": "pw-for-tests-only"}
    )
    assert again.json() == {"token": token}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(
            {"username": "alice", "password": "wrong"}, "non_field_errors", id="bad password"
        ),
        pytest.param({"username": "nobody", "password": "x"}, "non_field_errors", id="no user"),
        pytest.param({"username": "alice"}, "password", id="missing password"),
        pytest.param({"password": "x"}, "username", id="missing username"),
    ],
)
def test_bad_credentials_are_400_with_field_errors(
    alice: object, body: dict[str, str], field: str
) -> None:
    response = APIClient().post("/api/auth/token/", body, format="json")

    assert response.status_code == 400
    assert field in response.json()
    assert "token" not in response.json()


def test_a_wrong_token_is_401(alice: object) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")

    response = client.get("/api/orders/")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


def test_session_authentication_works_too(alice: object) -> None:
    client = APIClient()
    assert client.get("/api/orders/").status_code == 401

    assert client.login(username="alice", password="pw-for-tests-only")
    assert client.get("/api/orders/").status_code == 200

    client.logout()
    assert client.get("/api/orders/").status_code == 401


def test_session_writes_need_the_csrf_token(alice: object) -> None:
    """Session auth is what a browser sends by itself: DRF demands CSRF for it."""
    client = APIClient(enforce_csrf_checks=True)
    client.login(username="alice", password="pw-for-tests-only")

    response = client.post("/api/orders/", {"lines": []}, format="json")

    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]


def test_probes_need_no_authentication(db: None) -> None:
    client = APIClient()

    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "database": "ok", "broker": "ok"}
