"""Check the system's invariants; print each violation; exit non-zero on any."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from eventing import invariants


class Command(BaseCommand):
    help = (
        "Verify the invariants the platform and the business apps promise: every event "
        "published and applied by each subscribed consumer, stock conserved, every order "
        "settled or legitimately pending, one notification per event, no dead letter or "
        "parked lane. Reads one consistent snapshot and changes nothing. Prints one line "
        "per violation with the ids to look it up, and exits 1 if there is any."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--grace",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help="Effects of events younger than this may still be in flight and are not "
            "judged (default 60; 0 once the flow is known to be quiet).",
        )
        parser.add_argument(
            "--only",
            action="append",
            default=[],
            metavar="NAME",
            help="Run only this invariant (repeatable); see --list.",
        )
        parser.add_argument("--list", action="store_true", help="List the invariants and exit.")
        parser.add_argument("--json", action="store_true", help="Print a JSON report.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["list"]:
            for inv in invariants.registry.all():
                self.stdout.write(f"{inv.name}: {inv.description}")
            return
        if options["grace"] < 0:
            raise CommandError("--grace must be >= 0 seconds, e.g. --grace 60")
        try:
            report = invariants.run(grace_seconds=options["grace"], only=options["only"] or None)
        except LookupError as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), indent=2))
        else:
            for line in report.lines():
                self.stdout.write(line)
            passed = sum(result.ok for result in report.results)
            self.stdout.write(
                f"{passed}/{len(report.results)} invariants hold; "
                f"{report.violation_count} violation(s)"
            )
        if not report.ok:
            raise CommandError(f"{report.violation_count} invariant violation(s)", returncode=1)
