"""gunicorn server hooks (`--config python:config.gunicorn_hooks` in the Procfile)."""

from __future__ import annotations

from typing import Any


def child_exit(server: Any, worker: Any) -> None:
    """A web worker exited: tell the Prometheus client, so multiprocess mode drops
    its live-gauge files (counters and histograms stay counted)."""
    from eventing.metrics import mark_process_dead

    mark_process_dead(worker.pid)
