"""Rebuild read models from the event store."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Max
from tqdm import tqdm

from eventing import replay
from eventing.consumers import Projection
from eventing.consumers import registry as consumers
from eventing.events import registry as events
from eventing.models import StoredEvent


class Command(BaseCommand):
    help = (
        "Rebuild projections' read models from the event store, exactly as the live path built "
        "them. Safe while the platform runs: the consumer is paused for the rebuild (its "
        "messages wait and are retried), and events past each lane's checkpoint are left to "
        "the live path. Policies (handlers that issue commands) are never rerun, and outside "
        "effects such as email are never re-sent. With no selection, rebuilds every projection."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--consumer", action="append", default=[], help="Rebuild this consumer's projections."
        )
        parser.add_argument(
            "--projection", action="append", default=[], help="Rebuild this projection."
        )
        parser.add_argument(
            "--aggregate",
            action="append",
            default=[],
            help="Only the rows derived from this aggregate id (repeatable).",
        )
        parser.add_argument(
            "--event-type",
            action="append",
            default=[],
            help="Only the rows of aggregates that have events of this type.",
        )
        parser.add_argument(
            "--from-position",
            type=int,
            help="Only the rows of aggregates with events at or after this global position.",
        )
        parser.add_argument("--batch-size", type=int, default=2000, help="Events per fetch.")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Rebuild in a rolled-back transaction; report what would change, change nothing.",
        )
        parser.add_argument(
            "--verify",
            action="store_true",
            help="Rebuild into a scratch transaction and diff it against the live read models; "
            "print each difference and exit non-zero on any.",
        )
        parser.add_argument(
            "--resume",
            action="store_true",
            help="Only clear a pause left by an interrupted replay, then exit.",
        )
        parser.add_argument("--json", action="store_true", help="Print a JSON report.")

    def _select(self, options: dict[str, Any]) -> list[Projection]:
        known_consumers = sorted({p.consumer for p in consumers.projections.values()})
        selected: dict[str, Projection] = {}
        for name in options["consumer"]:
            if name not in known_consumers:
                raise CommandError(
                    f"unknown consumer {name!r}; valid choices: {', '.join(known_consumers)}"
                )
            selected.update({p.name: p for p in consumers.projections_of(name)})
        for name in options["projection"]:
            if name not in consumers.projections:
                raise CommandError(
                    f"unknown projection {name!r}; valid choices: "
                    f"{', '.join(sorted(consumers.projections))}"
                )
            selected[name] = consumers.projections[name]
        if not selected:
            selected = dict(consumers.projections)
        return [selected[name] for name in sorted(selected)]

    def handle(self, *args: Any, **options: Any) -> None:
        projections = self._select(options)
        if options["resume"]:
            names = sorted({p.consumer for p in projections})
            replay.resume(names)
            self.stdout.write(f"resumed: {', '.join(names)}")
            return
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1, e.g. 2000")
        if options["dry_run"] and options["verify"]:
            raise CommandError("choose one of --dry-run and --verify")
        head = StoredEvent.objects.aggregate(head=Max("position"))["head"] or 0
        position = options["from_position"]
        if position is not None and not 1 <= position <= max(head, 1):
            raise CommandError(
                f"--from-position {position} is outside the store: valid positions are 1..{head}"
            )
        for event_type in options["event_type"]:
            if event_type not in events:
                raise CommandError(
                    f"unknown event type {event_type!r}; valid choices: "
                    f"{', '.join(sorted(events.all()))}"
                )
        aggregate_ids = replay.affected_aggregates(
            projections,
            aggregate_ids=set(options["aggregate"]) or None,
            event_types=set(options["event_type"]) or None,
            from_position=position,
        )
        scratch = options["dry_run"] or options["verify"]
        bar = tqdm(desc="replaying", unit="ev", disable=None, file=sys.stderr, dynamic_ncols=True)
        started = time.monotonic()
        try:
            result = replay.rebuild(
                projections,
                aggregate_ids=aggregate_ids,
                commit=not scratch,
                compare=scratch,
                batch_size=options["batch_size"],
                progress=bar.update,
                total_hint=lambda total: setattr(bar, "total", total),
            )
        except replay.ReplayError as exc:
            raise CommandError(f"replay stopped, nothing changed: {exc}") from exc
        finally:
            bar.close()
        elapsed = time.monotonic() - started
        report = {
            "projections": result.projections,
            "events_read": result.events_read,
            "events_applied": result.events_applied,
            "rows_cleared": result.rows_cleared,
            "committed": result.committed,
            "seconds": round(elapsed, 3),
            "events_per_second": round(result.events_read / elapsed) if elapsed else None,
            "differences": [d.describe() for d in result.differences],
        }
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            mode = "verified" if options["verify"] else "dry run of" if scratch else "rebuilt"
            self.stdout.write(
                f"{mode} {', '.join(result.projections)}: {result.events_read} events read, "
                f"{result.events_applied} handler calls, in {elapsed:.2f}s"
            )
            for line in report["differences"]:
                self.stdout.write(f"  {line}")
            if scratch:
                self.stdout.write(f"{len(result.differences)} difference(s); nothing was changed")
        if options["verify"] and result.differences:
            raise CommandError(
                f"{len(result.differences)} read-model row(s) differ from a rebuild from the "
                "event store; run replay_events without --verify to repair them"
            )
