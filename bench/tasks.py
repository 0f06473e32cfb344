"""Bench-only Celery tasks, loaded by the bench worker with `-I bench.tasks`.

They are the raw baselines: nothing in the apps knows them.
"""

from __future__ import annotations

import time

from celery import shared_task
from django.db import connection


@shared_task(name="bench.noop", ignore_result=True)
def noop() -> None:
    """The no-op task: what a Celery round trip costs with nothing to do."""


@shared_task(name="bench.stamp", ignore_result=True)
def stamp(seq: int, sent_at: float) -> None:
    """Record how long after `sent_at` (the sender's time.time()) this task
    started. Same machine, same clock."""
    started = time.time()
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO bench_stamp (seq, latency) VALUES (%s, %s)", [seq, started - sent_at]
        )
