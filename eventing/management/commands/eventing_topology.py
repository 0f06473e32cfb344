"""Print who publishes each event, who consumes it, and on which queue."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from eventing.topology import topology


class Command(BaseCommand):
    help = (
        "Print the event topology: for each registered event type, the app that publishes "
        "it, its schema version, and each consuming handler with its queue and task."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print JSON for scripts.")

    def handle(self, *args: Any, **options: Any) -> None:
        rows = topology()
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for row in rows:
            self.stdout.write(
                self.style.MIGRATE_HEADING(f"{row['event']} v{row['version']}")
                + f"  published by {row['publisher']} ({row['aggregate_type']})"
            )
            if not row["consumers"]:
                self.stdout.write("    (no consumers)")
            for consumer in row["consumers"]:
                effects = (
                    "  [side effects: not re-sent on replay]" if consumer["side_effects"] else ""
                )
                self.stdout.write(
                    f"    -> {consumer['consumer']:14} queue {consumer['queue']:16} "
                    f"{consumer['handler']}{effects}"
                )
