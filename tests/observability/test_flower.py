"""Flower, as `make run` starts it: basic auth, tasks labelled with the event and
aggregate they handle, and its own Prometheus endpoint."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orders.models import CatalogItem, Order
from orders.services import order_place

from ..factories import UserFactory, stock_item
from ..support import ROOT, Worker, wait_for
from .conftest import free_port, http

USER, PASSWORD = "flower-test", "not-secret"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}

pytestmark = pytest.mark.live


@pytest.fixture
def flower(live: Worker, artifacts_dir: Path) -> Iterator[str]:
    port = free_port()
    celery = str(Path(sys.executable).parent / "celery")
    with open(artifacts_dir / "flower.log", "ab") as log:
        proc = subprocess.Popen(
            [
                celery,
                "-A",
                "config",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                f"--basic-auth={USER}:{PASSWORD}",
            ],
            cwd=ROOT,
            env=live.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: http("GET", f"{url}/healthcheck")[0] == 200,
            timeout=60,
            interval=0.3,
            what="Flower to answer",
        )
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_flower_tasks_name_the_event_and_aggregate_they_handle(flower: str) -> None:
    assert http("GET", f"{flower}/api/tasks")[0] == 401  # basic auth required
    stock_item("FL-1", on_hand=5)
    wait_for(lambda: CatalogItem.objects.filter(sku="FL-1").exists(), what="the catalog")
    order = order_place(customer_id=UserFactory().pk, lines=[{"sku": "FL-1", "quantity": 1}])
    wait_for(
        lambda: Order.objects.filter(pk=order.pk, status="CONFIRMED").exists(),
        what="the order to be confirmed",
    )
    label = f"orders.OrderPlaced orders.Order/{order.pk} v1"

    def inventory_task() -> dict | None:
        status, body = http(
            "GET", f"{flower}/api/tasks?taskname=inventory.handle_event", headers=AUTH
        )
        assert status == 200, body
        return next((t for t in json.loads(body).values() if label in (t.get("args") or "")), None)

    task = wait_for(inventory_task, timeout=30, interval=0.5, what=f"Flower to list {label!r}")
    assert task["name"] == "inventory.handle_event"
    assert task["state"] == "SUCCESS"

    # Flower's own Prometheus metrics (served without auth by Flower 2.2).
    status, text = http("GET", f"{flower}/metrics")
    assert status == 200
    assert "flower_events_total" in text
