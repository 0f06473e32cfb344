"""Run the relay in this process: once, or in a loop."""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from eventing import relay


class Command(BaseCommand):
    help = (
        "Publish pending outbox rows to RabbitMQ (the same relay Celery beat runs every "
        "second). Without --loop it drains the outbox once and exits."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--loop", action="store_true", help="Keep relaying until Ctrl-C.")
        parser.add_argument(
            "--interval", type=float, default=0.5, help="Pause between idle loops (seconds)."
        )
        parser.add_argument("--json", action="store_true", help="Print a JSON report.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["interval"] <= 0:
            raise CommandError("--interval must be a positive number of seconds, e.g. 0.5")
        while True:
            report = relay.relay()
            summary = {
                "published": report.published_rows,
                "messages": report.messages,
                "failed": report.failed_rows,
                "batches": report.batches,
                "errors": report.errors,
            }
            if options["json"]:
                self.stdout.write(json.dumps(summary))
            elif report.batches or not options["loop"]:
                self.stdout.write(
                    f"published {report.published_rows} row(s) as {report.messages} message(s)"
                    f" in {report.batches} batch(es); {report.failed_rows} failed"
                    + (f": {'; '.join(report.errors)}" if report.errors else "")
                )
            if not options["loop"]:
                if report.failed_rows:
                    raise CommandError(
                        "some rows were not published; they stay in the outbox and are retried "
                        "(is RabbitMQ up? see `manage.py eventing_status`)"
                    )
                return
            if not report.batches:
                time.sleep(options["interval"])
