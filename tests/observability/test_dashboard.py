"""The staff dashboard: flow graph, throughput and lag charts, what needs a person."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from django.test import Client
from django.urls import reverse
from django.utils import timezone

from eventing.consumers import registry as consumer_registry
from eventing.dashboard import WINDOW_MINUTES, sample_consumer_lag
from eventing.models import Checkpoint, ConsumerLagSample, DeadLetter, StoredEvent
from eventing.topology import topology

from ..factories import UserFactory, stock_item

URL = "/admin/eventing/dashboard/"


def _client(**user: Any) -> Client:
    client = Client()
    client.force_login(UserFactory(**user))
    return client


def _json_script(html: str, element_id: str) -> dict[str, Any]:
    match = re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', html)
    assert match, f"no {element_id} data in the page"
    return json.loads(match.group(1))


def test_dashboard_renders_the_flow_graph_and_charts_for_staff(db: None) -> None:
    stock_item("D-1", on_hand=5)
    stock_item("D-2", on_hand=5)
    five_minutes_ago = timezone.now() - dt.timedelta(minutes=5)
    ConsumerLagSample.objects.create(consumer="orders", sampled_at=five_minutes_ago, lag_events=7)
    ConsumerLagSample.objects.create(consumer="orders", sampled_at=five_minutes_ago, lag_events=4)

    response = _client(username="ops", is_staff=True).get(URL)

    assert response.status_code == 200
    html = response.content.decode()
    # The flow graph: a node per event type, publisher and consumer, and edges.
    assert 'id="flow-graph"' in html and "<svg" in html
    for row in topology():
        assert f'id="event-{row["event"]}"' in html
    for node in ("publisher-orders", "publisher-inventory", "consumer-notifications"):
        assert f'id="{node}"' in html
    assert html.count('class="ev-edge ev-edge-consumes"') >= 5
    assert "ev-edge-side-effects" in html  # notifications' email handlers
    # The charts: containers naming their data, and the data itself.
    assert 'id="throughput-chart" data-chart="throughput-data"' in html
    assert 'id="lag-chart" data-chart="lag-data"' in html
    assert "eventing/dashboard.js" in html
    throughput = _json_script(html, "throughput-data")
    assert len(throughput["labels"]) == WINDOW_MINUTES
    series = {s["name"]: s["values"] for s in throughput["series"]}
    assert sum(series["all events"]) == StoredEvent.objects.count() == 2
    assert sum(series["inventory"]) == 2 and series["all events"][-1] == 2
    lag = _json_script(html, "lag-data")
    lag_series = {s["name"]: s["values"] for s in lag["series"]}
    # Every registered consumer (other test modules register their own too).
    assert (
        set(lag_series)
        == {spec.name for spec in consumer_registry.all()}
        >= {
            "inventory",
            "notifications",
            "orders",
        }
    )
    assert lag_series["orders"][-6] == 7  # the larger sample of that minute
    assert lag_series["orders"][-1] == 2  # now: orders has not applied the two items
    assert lag_series["inventory"][:-1] == [None] * (WINDOW_MINUTES - 1)  # never sampled
    assert "2 in the last hour" in html  # the StockItemAdded node


def test_dashboard_links_backlog_dead_letters_and_parked_lanes(db: None) -> None:
    stock_item("D-3", on_hand=5)
    event = StoredEvent.objects.get()
    DeadLetter.objects.create(consumer="orders", event=event, error="boom", attempts=3)
    Checkpoint.objects.create(
        consumer="orders",
        aggregate_type=event.aggregate_type,
        aggregate_id=event.aggregate_id,
        parked=True,
        parked_reason="RuntimeError: boom",
    )

    html = _client(username="ops", is_staff=True).get(URL).content.decode()

    outbox = reverse("admin:eventing_outboxmessage_changelist")
    dead = reverse("admin:eventing_deadletter_changelist")
    parked = reverse("admin:eventing_checkpoint_changelist")
    card = re.search(r'id="card-outbox"\s+href="([^"]+)">\s*<span class="ev-number">(\d+)', html)
    assert card and card.groups() == (outbox, "1")
    card = re.search(
        r'id="card-dead-letters"\s+href="([^"]+)">\s*<span class="ev-number">(\d+)', html
    )
    assert card and card.groups() == (f"{dead}?status__exact=open", "1")
    card = re.search(
        r'id="card-parked-lanes"\s+href="([^"]+)">\s*<span class="ev-number">(\d+)', html
    )
    assert card and card.groups() == (f"{parked}?parked__exact=1", "1")
    assert f"{dead}?status__exact=open&amp;consumer__exact=orders" in html
    assert 'id="parked-lanes"' in html and "RuntimeError: boom" in html


def test_dashboard_is_refused_to_customers_and_anonymous_visitors(db: None) -> None:
    for client in (_client(username="alice"), Client()):
        response = client.get(URL)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
    assert b"flow-graph" not in _client(username="bob").get(URL, follow=True).content


def test_admin_pages_link_to_the_dashboard(db: None) -> None:
    client = _client(username="ops", is_staff=True, is_superuser=True)
    assert f'href="{URL}"' in client.get("/admin/").content.decode()
    assert f'href="{URL}"' in client.get("/admin/eventing/").content.decode()


def test_lag_samples_are_recorded_per_consumer_and_pruned_after_a_day(db: None) -> None:
    stock_item("D-4", on_hand=5)
    old = ConsumerLagSample.objects.create(
        consumer="orders", sampled_at=timezone.now() - dt.timedelta(days=2), lag_events=1
    )

    consumers = {spec.name for spec in consumer_registry.all()}
    assert sample_consumer_lag() == len(consumers)

    samples = {s.consumer: s for s in ConsumerLagSample.objects.all()}
    assert set(samples) == consumers
    assert samples["orders"].lag_events == 1 and samples["orders"].oldest_age_seconds is not None
    assert samples["notifications"].lag_events == 0
    assert not ConsumerLagSample.objects.filter(pk=old.pk).exists()
