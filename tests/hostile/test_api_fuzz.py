"""schemathesis against the project's own OpenAPI schema, in-process on the
WSGI application, as a staff user and as a customer (token authentication).

Every generated request, valid or not, must get an answer the schema
documents: no 500, a documented status code and content type, a body that
matches the documented schema, and the documented headers. Examples are kept
few per operation so the whole run stays well under a minute and a half.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.conf import LazySettings
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.core.failures import FailureGroup

from config.wsgi import application
from orders.services import order_place

from ..api.conftest import drain
from ..factories import UserFactory, stock_item

pytestmark = [pytest.mark.hostile, pytest.mark.timeout(150)]

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.response_headers_conformance,
]


@pytest.fixture
def world(db: None, settings: LazySettings) -> dict[str, Any]:
    """A stocked item, an order of the customer's, and a token for each caller."""
    # A random consistency token must not make every query wait the full 5 s.
    settings.EVENTING = {**settings.EVENTING, "CONSISTENCY_WAIT_SECONDS": 0.05}
    # As deployed: no debug pages (a URL no route matches gets the JSON 404).
    settings.DEBUG = False
    stock_item("SKU-FUZZ", on_hand=10_000)
    drain()
    customer = UserFactory(username="fuzz-customer")
    staff = UserFactory(username="fuzz-staff", is_staff=True)
    order = order_place(customer_id=customer.pk, lines=[{"sku": "SKU-FUZZ", "quantity": 1}])
    drain()
    return {
        "path_ids": {"id": str(order.pk), "sku": "SKU-FUZZ"},
        "customer": Token.objects.create(user=customer).key,
        "staff": Token.objects.create(user=staff).key,
    }


@pytest.fixture
def in_process_requests() -> Iterator[None]:
    """The requests run on this test's connection, inside its rolled-back
    transaction: like Django's test client, keep the request signals from
    closing that connection."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def api_schema(in_process_requests: None) -> Any:
    document = SchemaGenerator().get_schema(request=None, public=True)
    loaded = schemathesis.openapi.from_dict(document)
    loaded.app = application
    return loaded


FUZZ = hypothesis_settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# drf-spectacular's own view (it answers 404 to an unknown ?format=); its
# content is checked by tests/api/test_schema.py.
SKIPPED = {"/api/schema/"}


def fuzz(api_schema: Any, world: dict[str, Any], caller: str) -> tuple[int, list[str]]:
    """Every operation, valid and invalid input, random and real path ids.
    Returns (requests made, distinct failures)."""
    headers = {"Authorization": f"Token {world[caller]}"}
    failures: dict[str, str] = {}
    calls = [0]

    def runner(label: str, strategy: Any) -> Any:
        @FUZZ
        @given(case=strategy)
        def run(case: Any) -> None:
            calls[0] += 1
            try:
                case.call_and_validate(headers=headers, checks=CHECKS)
            except (AssertionError, FailureGroup) as exc:
                first = str(exc).strip().splitlines()[0][:200]
                failures.setdefault(f"{label}: {first}", f"{label}: {str(exc)[:1500]}")

        return run

    for result in api_schema.get_all_operations():
        operation = result.ok()
        if operation.path in SKIPPED:
            continue
        real_ids = {
            name: world["path_ids"][name]
            for name in ("id", "sku")
            if "{" + name + "}" in operation.path
        }
        for mode in MODES:
            for path_parameters in ({}, real_ids) if real_ids else ({},):
                strategy = operation.as_strategy(
                    generation_mode=mode, path_parameters=path_parameters or None
                )
                label = f"{operation.label} [{mode.value}{', real ids' if path_parameters else ''}]"
                try:
                    runner(label, strategy)()
                except Unsatisfiable:
                    pass  # e.g. no invalid input exists for an operation without parameters
    return calls[0], sorted(failures.values())


@pytest.mark.parametrize("caller", ["customer", "staff"])
def test_every_operation_answers_as_documented(
    api_schema: Any, world: dict[str, Any], caller: str
) -> None:
    calls, failures = fuzz(api_schema, world, caller)
    print(f"\nschemathesis as {caller}: {calls} requests, {len(failures)} distinct failure(s)")
    assert calls > 100
    assert not failures, "\n\n".join(failures)


def test_an_api_url_no_route_matches_answers_json(world: dict[str, Any]) -> None:
    """What the fuzzing found: `/api/...` URLs that match no route (an SKU
    with a dot or a slash) answered Django's HTML page, not the API's JSON."""
    from django.test import Client

    response = Client().get("/api/inventory/items/SKU.1/receive/")

    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}
    assert Client().get("/nowhere/")["Content-Type"].startswith("text/html")
