"""Retention for what the platform accumulates."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from eventing.models import Checkpoint, ConsumerState, DeadLetter, OutboxMessage


class Command(BaseCommand):
    help = (
        "Apply retention. Published outbox rows are deleted by the relay as soon as the broker "
        "confirms them, so the outbox only ever holds unpublished rows, which are never pruned. "
        "This prunes resolved (redriven or discarded) dead letters older than --days, and "
        "checkpoints of lanes whose consumer no longer exists (after renaming a consumer). "
        "The event store is never pruned. Safe to rerun."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days", type=int, default=30, help="Keep resolved dead letters this long."
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would go; delete nothing."
        )
        parser.add_argument("--json", action="store_true", help="Print JSON for scripts.")

    def handle(self, *args: Any, **options: Any) -> None:
        from eventing.consumers import registry

        if options["days"] < 0:
            raise CommandError("--days must be 0 or more, e.g. --days 30")
        cutoff = timezone.now() - dt.timedelta(days=options["days"])
        resolved = DeadLetter.objects.exclude(status=DeadLetter.Status.OPEN).filter(
            resolved_at__lt=cutoff
        )
        known = [c.name for c in registry.all()]
        orphans = Checkpoint.objects.exclude(consumer__in=known)
        orphan_states = ConsumerState.objects.exclude(consumer__in=known)
        report = {
            "dead_letters": resolved.count(),
            "orphan_checkpoints": orphans.count(),
            "orphan_consumer_states": orphan_states.count(),
            "outbox_pending": OutboxMessage.objects.count(),
            "dry_run": options["dry_run"],
        }
        if not options["dry_run"]:
            resolved.delete()
            orphans.delete()
            orphan_states.delete()
        if options["json"]:
            self.stdout.write(json.dumps(report))
            return
        verb = "would prune" if options["dry_run"] else "pruned"
        self.stdout.write(
            f"{verb} {report['dead_letters']} resolved dead letter(s), "
            f"{report['orphan_checkpoints']} orphan checkpoint(s); "
            f"{report['outbox_pending']} unpublished outbox row(s) kept"
        )
