"""The event topology, derived from the registries (never written by hand)."""

from __future__ import annotations

from typing import Any

from .consumers import registry as consumers
from .events import registry as events


def topology() -> list[dict[str, Any]]:
    rows = []
    for name, cls in sorted(events.all().items()):
        rows.append(
            {
                "event": name,
                "version": cls.version,
                "aggregate_type": cls.aggregate_type,
                # An event class lives in its publisher's `events.py`.
                "publisher": cls.__module__.split(".")[0],
                "consumers": [
                    {
                        "consumer": consumer.name,
                        "queue": consumer.queue_name,
                        "task": consumer.task_name,
                        "handler": spec.qualname,
                        "side_effects": spec.side_effects,
                    }
                    for consumer in consumers.all()
                    for spec in consumer.handlers.get(name, [])
                ],
            }
        )
    return rows
