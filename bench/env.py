"""The benchmark environment, fixed before Django settings load.

Imported first by `bench.__main__`. Everything the benchmarks (and the worker
subprocesses they start) see comes from `bench_environ()`: a dedicated
database, the `bench.` queue prefix, DEBUG off (no query log growing in long
loops) and a throwaway secret key.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = (
    Path(__file__).absolute().parent.parent
)  # not resolved: a symlinked checkout keeps its own tree
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# BENCH_QUEUE_PREFIX lets two bench runs share a broker (with two databases).
QUEUE_PREFIX = os.environ.get("BENCH_QUEUE_PREFIX", "bench.") or "bench."
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/bench_eventflow"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
APP_QUEUES = ("orders", "inventory", "notifications", "relay")


def database_url() -> str:
    """`BENCH_DATABASE_URL`, else the default bench database. Never the dev
    `DATABASE_URL`: the bench truncates tables."""
    url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    name = urlsplit(url).path.lstrip("/")
    if name in ("", "eventflow", "test_eventflow"):
        raise SystemExit(f"refusing to benchmark on database {name!r}: it is not a bench database")
    return url


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def maintenance_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, parts.fragment))


def bench_environ() -> dict[str, str]:
    """The variables that make a process (this one or a worker) a bench process."""
    return {
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url(),
        "EVENTING_QUEUE_PREFIX": QUEUE_PREFIX,
        "CELERY_BROKER_URL": os.environ.get("BENCH_BROKER_URL", DEFAULT_BROKER_URL),
        "DEBUG": "0",
        "SECRET_KEY": "bench-only",
        "EMAIL_BACKEND": "django.core.mail.backends.dummy.EmailBackend",
        "LOG_LEVEL": "WARNING",
        # Long runs hold one connection; nothing to gain from recycling it.
        "CONN_MAX_AGE": "600",
    }


def apply() -> None:
    os.environ.update(bench_environ())
