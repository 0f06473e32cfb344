"""The OpenAPI schema, validated by drf-spectacular's own validator."""

from __future__ import annotations

from pathlib import Path

import yaml
from django.core.management import call_command
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema

ENDPOINTS = {
    "/api/auth/token/": {"post"},
    "/api/inventory/items/": {"get", "post"},
    "/api/inventory/items/{sku}/": {"get"},
    "/api/inventory/items/{sku}/receive/": {"post"},
    "/api/orders/": {"get", "post"},
    "/api/orders/{id}/": {"get"},
    "/api/orders/{id}/cancel/": {"post"},
    "/api/orders/{id}/ship/": {"post"},
    "/api/notifications/": {"get"},
    "/api/events/": {"get"},
    "/api/eventing/status/": {"get"},
}


def test_schema_validates_without_a_single_warning(tmp_path: Path) -> None:
    out = tmp_path / "schema.yaml"

    # --fail-on-warn turns every generator warning (an untyped field, an
    # unresolvable path parameter, a name clash) into an error.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))

    schema = yaml.safe_load(out.read_text())
    validate_schema(schema)
    paths = {
        path: {m for m in ops if m in {"get", "post", "put", "patch", "delete"}}
        for path, ops in schema["paths"].items()
    }
    for path, methods in ENDPOINTS.items():
        assert paths.get(path) == methods, path


def test_schema_documents_what_clients_rely_on() -> None:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    paths = schema["paths"]

    place = paths["/api/orders/"]["post"]["responses"]
    assert set(place["201"]["headers"]) == {"Location", "X-Consistency-Token"}
    assert {"400", "401"} <= set(place)
    ship = paths["/api/orders/{id}/ship/"]["post"]["responses"]
    assert {"200", "401", "403", "404", "409"} <= set(ship)
    detail = paths["/api/orders/{id}/"]["get"]
    assert {p["name"] for p in detail["parameters"]} >= {"consistency_token", "X-Consistency-Token"}
    order = schema["components"]["schemas"]["OrderDetail"]["properties"]
    assert {"status", "lines", "total", "timeline", "consistency"} <= set(order)
    item = schema["components"]["schemas"]["StockItem"]["properties"]
    assert {"on_hand", "reserved", "available"} <= set(item)
    # The token endpoint is open (no security requirement, and none at the root).
    assert "security" not in schema
    assert "security" not in paths["/api/auth/token/"]["post"]
    assert paths["/api/orders/"]["get"]["security"] == [{"tokenAuth": []}, {"cookieAuth": []}]
