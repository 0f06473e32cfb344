"""Print the platform's health: backlog, lag, dead letters, parked lanes."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from eventing.selectors import eventing_status


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


class Command(BaseCommand):
    help = (
        "Show the outbox backlog and the age of its oldest row, each consumer's queue depth "
        "and lag (events not yet applied), open dead letters and parked lanes."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print JSON for scripts.")
        parser.add_argument(
            "--no-broker", action="store_true", help="Skip asking RabbitMQ for queue depths."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        status = eventing_status(include_broker=not options["no_broker"])
        if options["json"]:
            self.stdout.write(json.dumps(status, indent=2, default=str))
            return
        outbox = status["outbox"]
        self.stdout.write(
            f"outbox: {outbox['pending']} pending ({outbox['failing']} failing), "
            f"oldest {_age(outbox['oldest_age_seconds'])}"
        )
        self.stdout.write(f"{'consumer':14} {'queue':>8} {'lag':>8} {'oldest':>9}  dead  parked")
        for row in status["consumers"]:
            depth = row["queue_depth"]
            queue = "?" if depth is None else str(depth["ready"])
            state = "  (paused)" if row["paused"] else ""
            self.stdout.write(
                f"{row['consumer']:14} {queue:>8} {row['lag']['events']:>8} "
                f"{_age(row['lag']['oldest_age_seconds']):>9}  {row['dead_letters']:>4}  "
                f"{row['parked_lanes']:>6}{state}"
            )
        for lane in status["parked_lanes"]["shown"]:
            self.stdout.write(
                f"parked: {lane['consumer']} {lane['aggregate_type']}/{lane['aggregate_id']} "
                f"at v{lane['version']}: {lane['reason'][:100]}"
            )
