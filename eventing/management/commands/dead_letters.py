"""List, show, redrive and discard dead letters."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from eventing import consumers
from eventing.models import DeadLetter
from eventing.selectors import dead_letters

_AGE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_age(text: str) -> dt.timedelta:
    match = _AGE.match(text)
    if match is None:
        raise CommandError(f"--older-than {text!r}: use a number and a unit, e.g. 30m, 6h, 2d")
    return dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _row(dead: DeadLetter) -> dict[str, Any]:
    event = dead.event
    return {
        "id": dead.pk,
        "consumer": dead.consumer,
        "status": dead.status,
        "event_type": event.event_type if event else None,
        "aggregate": f"{event.aggregate_type}/{event.aggregate_id}" if event else None,
        "version": event.version if event else None,
        "attempts": dead.attempts,
        "created_at": dead.created_at.isoformat(),
        "error": dead.error,
    }


class Command(BaseCommand):
    help = (
        "Work with dead letters: `list` (filters: --consumer, --event-type, --older-than, "
        "--status), `show ID`, `redrive ID... | --all` (un-parks the lane and replays it in "
        "order), `discard ID... --reason TEXT` (the lane stays parked until a redrive)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["list", "show", "redrive", "discard"])
        parser.add_argument("ids", nargs="*", type=int, help="Dead letter ids.")
        parser.add_argument("--consumer")
        parser.add_argument("--event-type")
        parser.add_argument("--older-than", help="e.g. 30m, 6h, 2d")
        parser.add_argument(
            "--status", default="open", choices=["open", "redriven", "discarded", "any"]
        )
        parser.add_argument(
            "--all", action="store_true", help="redrive/discard every match of the filters."
        )
        parser.add_argument("--reason", default="", help="Why (required for discard).")
        parser.add_argument("--json", action="store_true", help="Print JSON for scripts.")

    def handle(self, *args: Any, **options: Any) -> None:
        known = sorted({c.name for c in consumers.registry.all()})
        if options["consumer"] and options["consumer"] not in known:
            raise CommandError(
                f"unknown consumer {options['consumer']!r}; valid choices: {', '.join(known)}"
            )
        matches = dead_letters(
            consumer=options["consumer"],
            event_type=options["event_type"],
            older_than=parse_age(options["older_than"]) if options["older_than"] else None,
            status=None if options["status"] == "any" else options["status"],
        )
        action = options["action"]
        if action == "list":
            rows = [_row(d) for d in matches]
            if options["json"]:
                self.stdout.write(json.dumps(rows, indent=2))
                return
            for row in rows:
                self.stdout.write(
                    f"#{row['id']:<6} {row['consumer']:14} {row['status']:9} "
                    f"{row['event_type'] or '-':32} {row['aggregate'] or '-'} "
                    f"v{row['version']}  x{row['attempts']}  {row['error'][:80]}"
                )
            self.stdout.write(f"{len(rows)} dead letter(s)")
            return
        targets = self._targets(options, matches)
        if action == "show":
            for dead in targets:
                row = _row(dead) | {"traceback": dead.traceback, "message": dead.message}
                self.stdout.write(json.dumps(row, indent=2, default=str))
            return
        by = "manage.py dead_letters"
        done = 0
        for dead in targets:
            try:
                if action == "redrive":
                    consumers.redrive(dead, by=by)
                else:
                    if not options["reason"].strip():
                        raise CommandError("discard needs --reason 'why this event is dropped'")
                    consumers.discard(dead, reason=options["reason"], by=by)
            except ValueError as exc:
                raise CommandError(str(exc)) from exc
            done += 1
        verb = "redriven" if action == "redrive" else "discarded"
        self.stdout.write(f"{done} dead letter(s) {verb}")

    def _targets(self, options: dict[str, Any], matches: Any) -> list[DeadLetter]:
        if options["all"]:
            if options["action"] == "show":
                raise CommandError("show takes ids, not --all")
            return list(matches)
        if not options["ids"]:
            raise CommandError(f"{options['action']} needs dead letter ids (or --all)")
        found = {d.pk: d for d in DeadLetter.objects.filter(pk__in=options["ids"])}
        missing = sorted(set(options["ids"]) - set(found))
        if missing:
            raise CommandError(
                f"no dead letter with id {', '.join(map(str, missing))}; "
                "see `manage.py dead_letters list --status any`"
            )
        return [found[i] for i in options["ids"]]
