"""The staff dashboard (`/admin/eventing/dashboard/`): the event flow as a graph,
throughput and consumer lag over the last hour, and what needs a person
(outbox backlog, dead letters, parked lanes), each linked to its admin page.

No front-end build: the flow graph is SVG drawn here; the two charts are drawn
by a small static script (`eventing/static/eventing/dashboard.js`) from JSON
embedded in the page.

Where the numbers come from:
- Throughput: events appended per minute, counted from `StoredEvent.time` over
  the newest `THROUGHPUT_WINDOW_EVENTS` events (the column has no index; the
  position bound keeps the query on the primary key however large the store).
- Lag: how many subscribed events a consumer has not applied yet. Checkpoints
  only know the present, so the `eventing.sample_lag` beat task records a
  `ConsumerLagSample` per consumer every minute; the chart shows the largest
  sample of each minute, and its last point is measured as the page loads.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from typing import Any

from django.contrib import admin
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from .consumers import registry as consumers
from .models import ConsumerLagSample
from .selectors import consumer_lag, eventing_status
from .topology import topology

WINDOW_MINUTES = 60
THROUGHPUT_WINDOW_EVENTS = 200_000
SAMPLE_RETENTION = dt.timedelta(days=1)


# -- lag samples (written by beat) ---------------------------------------------------


def sample_consumer_lag(now: dt.datetime | None = None) -> int:
    """Record every consumer's current lag; prune samples past retention.
    Returns how many samples were written."""
    now = now or timezone.now()
    samples = []
    for spec in consumers.all():
        lag = consumer_lag(spec.name)
        samples.append(
            ConsumerLagSample(
                consumer=spec.name,
                sampled_at=now,
                lag_events=lag["events"],
                oldest_age_seconds=lag["oldest_age_seconds"],
            )
        )
    ConsumerLagSample.objects.bulk_create(samples)
    ConsumerLagSample.objects.filter(sampled_at__lt=now - SAMPLE_RETENTION).delete()
    return len(samples)


# -- the charts' data ----------------------------------------------------------------


def _minutes(now: dt.datetime) -> list[dt.datetime]:
    """The last WINDOW_MINUTES minute starts, oldest first, the current one last."""
    current = now.replace(second=0, microsecond=0)
    return [current - dt.timedelta(minutes=n) for n in range(WINDOW_MINUTES - 1, -1, -1)]


def _labels(minutes: list[dt.datetime]) -> list[str]:
    return [timezone.localtime(m).strftime("%H:%M") for m in minutes]


def appended_per_minute(now: dt.datetime) -> dict[tuple[dt.datetime, str], int]:
    """(minute, event type) -> events appended, over the last hour."""
    since = _minutes(now)[0]
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT date_trunc('minute', time), event_type, count(*)
            FROM eventing_storedevent
            WHERE position > (SELECT coalesce(max(position), 0) - %s FROM eventing_storedevent)
              AND time >= %s
            GROUP BY 1, 2
            """,
            [THROUGHPUT_WINDOW_EVENTS, since],
        )
        return {(minute, event_type): count for minute, event_type, count in cursor.fetchall()}


def throughput_chart(
    now: dt.datetime, counts: dict[tuple[dt.datetime, str], int]
) -> dict[str, Any]:
    """One series per publishing app plus the total, events per minute."""
    minutes = _minutes(now)
    index = {minute: n for n, minute in enumerate(minutes)}
    by_app: dict[str, list[int]] = defaultdict(lambda: [0] * len(minutes))
    total = [0] * len(minutes)
    for (minute, event_type), count in counts.items():
        n = index.get(minute)
        if n is None:
            continue
        by_app[event_type.split(".", 1)[0]][n] += count
        total[n] += count
    series = [{"name": "all events", "values": total}]
    series += [{"name": app, "values": values} for app, values in sorted(by_app.items())]
    return {
        "title": "Events appended per minute",
        "unit": "events/min",
        "labels": _labels(minutes),
        "series": series,
        "total": sum(total),
    }


def lag_chart(now: dt.datetime, current: dict[str, int]) -> dict[str, Any]:
    """Per consumer, the largest lag sampled in each minute (None: no sample),
    with the current minute measured now."""
    minutes = _minutes(now)
    index = {minute: n for n, minute in enumerate(minutes)}
    names = [spec.name for spec in consumers.all()]
    values: dict[str, list[int | None]] = {name: [None] * len(minutes) for name in names}
    samples = ConsumerLagSample.objects.filter(sampled_at__gte=minutes[0]).values_list(
        "consumer", "sampled_at", "lag_events"
    )
    sampled = 0
    for consumer, sampled_at, lag in samples:
        n = index.get(sampled_at.replace(second=0, microsecond=0))
        if consumer not in values or n is None:
            continue
        sampled += 1
        previous = values[consumer][n]
        values[consumer][n] = lag if previous is None else max(previous, lag)
    for name in names:
        values[name][-1] = current.get(name, 0)
    return {
        "title": "Consumer lag (events not applied yet)",
        "unit": "events",
        "labels": _labels(minutes),
        "series": [{"name": name, "values": values[name]} for name in names],
        "samples": sampled,
    }


# -- the flow graph ------------------------------------------------------------------


@dataclasses.dataclass
class Node:
    id: str
    label: str
    sublabel: str
    x: float
    y: float
    width: float
    kind: str  # publisher | event | consumer
    title: str = ""

    @property
    def height(self) -> float:
        return FLOW_ROW - 6

    @property
    def top(self) -> float:
        return self.y - self.height / 2

    @property
    def right(self) -> float:
        return self.x + self.width

    @property
    def text_x(self) -> float:
        return self.x + 8


@dataclasses.dataclass
class Edge:
    path: str
    kind: str  # publishes | consumes | side-effects
    title: str


FLOW_ROW = 30
FLOW_COLUMNS = {"publisher": (10, 150), "event": (250, 300), "consumer": (660, 170)}
FLOW_WIDTH = 840


def _curve(x1: float, y1: float, x2: float, y2: float) -> str:
    mid = (x1 + x2) / 2
    return f"M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"


def flow_graph(per_hour: dict[str, int]) -> dict[str, Any]:
    """Who publishes what to whom, laid out in three columns: publishing app,
    event type, consuming app (its queue). Built from the registries, so it
    is the topology the running code has, not a drawing someone maintains."""
    rows = sorted(topology(), key=lambda r: (r["publisher"], r["event"]))
    consumer_names = [spec.name for spec in consumers.all()]
    height = max(len(rows), len(consumer_names), 1) * FLOW_ROW + 20
    nodes: list[Node] = []
    edges: list[Edge] = []
    event_nodes: dict[str, Node] = {}
    x, width = FLOW_COLUMNS["event"]
    for n, row in enumerate(rows):
        node = Node(
            id=f"event-{row['event']}",
            label=row["event"],
            sublabel=f"v{row['version']} · {per_hour.get(row['event'], 0)} in the last hour",
            x=x,
            y=10 + FLOW_ROW * n + FLOW_ROW / 2,
            width=width,
            kind="event" if row["consumers"] else "event unconsumed",
            title=f"{row['event']} (aggregate {row['aggregate_type']})",
        )
        event_nodes[row["event"]] = node
        nodes.append(node)
    publishers: dict[str, list[Node]] = defaultdict(list)
    for row in rows:
        publishers[row["publisher"]].append(event_nodes[row["event"]])
    x, width = FLOW_COLUMNS["publisher"]
    for name, events in publishers.items():
        y = sum(e.y for e in events) / len(events)
        node = Node(f"publisher-{name}", name, f"publishes {len(events)}", x, y, width, "publisher")
        nodes.append(node)
        for event in events:
            path = _curve(node.right, y, event.x, event.y)
            edges.append(Edge(path, "publishes", f"{name} → {event.label}"))
    x, width = FLOW_COLUMNS["consumer"]
    spacing = (height - 20) / max(len(consumer_names), 1)
    consumer_nodes = {}
    for n, name in enumerate(consumer_names):
        spec = consumers.get(name)
        node = Node(
            f"consumer-{name}",
            name,
            f"queue {spec.queue_name}",
            x,
            10 + spacing * n + spacing / 2,
            width,
            "consumer",
        )
        consumer_nodes[name] = node
        nodes.append(node)
    for row in rows:
        event = event_nodes[row["event"]]
        by_consumer: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for handler in row["consumers"]:
            by_consumer[handler["consumer"]].append(handler)
        for name, handlers in by_consumer.items():
            target = consumer_nodes.get(name)
            if target is None:
                continue
            side_effects = any(h["side_effects"] for h in handlers)
            edges.append(
                Edge(
                    _curve(event.right, event.y, target.x, target.y),
                    "side-effects" if side_effects else "consumes",
                    f"{event.label} → {name}: " + ", ".join(h["handler"] for h in handlers),
                )
            )
    return {"width": FLOW_WIDTH, "height": height, "nodes": nodes, "edges": edges}


# -- the page ------------------------------------------------------------------------


def dashboard_view(request: HttpRequest) -> HttpResponse:
    """Staff only: wrap it in `admin.site.admin_view` (see config/urls.py)."""
    now = timezone.now()
    status = eventing_status()
    counts = appended_per_minute(now)
    per_type_hour: dict[str, int] = defaultdict(int)
    for (_, event_type), count in counts.items():
        per_type_hour[event_type] += count
    current_lag = {row["consumer"]: row["lag"]["events"] for row in status["consumers"]}
    context = {
        **admin.site.each_context(request),
        "title": "Event flow dashboard",
        "status": status,
        "flow": flow_graph(per_type_hour),
        "throughput": throughput_chart(now, counts),
        "lag": lag_chart(now, current_lag),
        "window_minutes": WINDOW_MINUTES,
    }
    return TemplateResponse(request, "eventing/dashboard.html", context)
