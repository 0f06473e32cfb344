"""Fixtures for the observability tests: an in-memory OpenTelemetry provider for
this process, a gunicorn web server subprocess, and Prometheus text parsing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from eventing import tracing

from ..support import ROOT, Worker, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="session")
def _span_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    # One provider for the session: the SDK's processors cannot be removed, and
    # this one is never made the global provider, so it reaches nothing else.
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=tracing.resource("test-web"))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def traced(_span_provider: tuple[TracerProvider, InMemorySpanExporter]) -> Iterator[Any]:
    """Tracing on in this process, as `config/wsgi.py` turns it on in gunicorn:
    Django and Celery instrumented, spans kept in memory. Create test clients
    inside the test: the Django middleware is added when this starts."""
    provider, exporter = _span_provider
    exporter.clear()
    tracing.install(provider, django=True, celery=True)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        exporter.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(
    method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """Status and body of one request (no redirects followed for errors)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - 127.0.0.1
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


class WebServer:
    """gunicorn as the Procfile runs it (two workers, the server hooks), on the
    test database and the worker's environment."""

    def __init__(self, env: dict[str, str], log_path: Path, *, workers: int = 2) -> None:
        self.env = env
        self.log_path = log_path
        self.workers = workers
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    gunicorn,
                    "config.wsgi:application",
                    "--config",
                    "python:config.gunicorn_hooks",
                    "--bind",
                    f"127.0.0.1:{self.port}",
                    "--workers",
                    str(self.workers),
                    "--worker-class",
                    "gthread",
                    "--threads",
                    "4",
                    "--no-control-socket",
                    "--error-logfile",
                    "-",
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited {self.proc.returncode}; see {self.log_path}")
            return http("GET", f"{self.url}/healthz")[0] == 200

        wait_for(answers, timeout=60, interval=0.2, what="gunicorn to answer /healthz")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Path:
    path = tmp_path / "prometheus"
    path.mkdir()
    return path


@pytest.fixture
def web_server(live: Worker, metrics_dir: Path, artifacts_dir: Path) -> Iterator[WebServer]:
    """gunicorn sharing the multiprocess directory with the worker (restarted
    with it), as `make run` has them share one."""
    live.restart(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    server = WebServer(
        {**live.env(), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, artifacts_dir / "web.log"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus exposition, parsed by the client's own parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name` over every label set that includes `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= set(lbls))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """`name` summed per value of one label (zero-valued series left out)."""
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name and v:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out
