"""Helpers for tests that run the event flow on the real services."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from kombu import Connection

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
APP_QUEUES = ("orders", "inventory", "notifications", "relay")


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "",
    explain: Callable[[], str] | None = None,
) -> T:
    """Poll until `predicate()` is truthy; fail with `what` at the deadline,
    and with what `explain()` then tells of the state the wait was stuck in."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    message = f"timed out after {timeout}s waiting for {what or predicate}: last={last!r}"
    if explain is not None:
        try:
            message += "\n" + explain()
        except Exception as exc:  # the explanation must not hide the timeout
            message += f"\n(could not describe the state: {type(exc).__name__}: {exc})"
    raise AssertionError(message)


def queue_name(name: str) -> str:
    return f"{settings.EVENTING_QUEUE_PREFIX}{name}"


def queue_depths(names: tuple[str, ...] = APP_QUEUES) -> dict[str, int]:
    """Ready messages per queue (passive declare: creates nothing)."""
    depths = {}
    with Connection(settings.CELERY_BROKER_URL) as conn:
        channel = conn.channel()
        for name in names:
            full = queue_name(name)
            try:
                _, count, _ = channel.queue_declare(full, passive=True)
            except Exception:
                channel = conn.channel()
                count = 0
            depths[name] = count
    return depths


def purge_queues(names: tuple[str, ...] = APP_QUEUES) -> None:
    from config.celery import app

    with Connection(settings.CELERY_BROKER_URL) as conn:
        channel = conn.channel()
        for queue in app.conf.task_queues:
            queue.bind(channel).declare()
        for name in names:
            channel.queue_purge(queue_name(name))


class Worker:
    """A real `celery worker` subprocess on the test database."""

    def __init__(self, database_name: str, log_path: Path, *, concurrency: int = 2) -> None:
        self.database_name = database_name
        self.log_path = log_path
        self.concurrency = concurrency
        self.name = f"testworker-{os.getpid()}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_env: dict[str, str] = {}

    def env(self) -> dict[str, str]:
        db = settings.DATABASES["default"]
        user = db.get("USER") or "postgres"
        host = db.get("HOST") or "127.0.0.1"
        port = db.get("PORT") or 5432
        env = dict(os.environ)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "config.test_settings",
                "DATABASE_URL": f"postgres://{user}@{host}:{port}/{self.database_name}",
                "EVENTING_QUEUE_PREFIX": settings.EVENTING_QUEUE_PREFIX,
                "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
                "EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
                "EMAIL_FILE_PATH": str(self.log_path.parent / "mail"),
            }
        )
        env.update(self.extra_env)
        return env

    def restart(self, **extra_env: str) -> None:
        """Stop (warm shutdown) and start again with `extra_env` set, as a
        deploy with a different configuration would."""
        self.stop()
        self.extra_env = dict(extra_env)
        self.start()

    def start(self) -> None:
        queues = ",".join(queue_name(n) for n in APP_QUEUES)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-Q",
                queues,
                "-c",
                str(self.concurrency),
                "-n",
                self.name,
                "--without-gossip",
                "--without-mingle",
                "-l",
                "info",
            ],
            cwd=ROOT,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        from config.celery import app

        def answered() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}; see {self.log_path}")
            replies = app.control.ping(destination=[self.name], timeout=0.5)
            return any(self.name in reply for reply in replies)

        wait_for(answered, timeout=timeout, interval=0.2, what="the celery worker to answer ping")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def busy(self) -> bool:
        """Whether the worker holds any task: running, prefetched or waiting on a countdown."""
        from config.celery import app

        inspect = app.control.inspect(destination=[self.name], timeout=1.0)
        for method in (inspect.active, inspect.reserved, inspect.scheduled):
            reply = method() or {}
            if self.name not in reply:
                return True  # no answer yet: assume busy and ask again
            if reply[self.name]:
                return True
        return False

    def held_tasks(self) -> dict[str, list[str]] | None:
        """The names of the tasks the worker holds, by state; None if it does not answer."""
        from config.celery import app

        inspect = app.control.inspect(destination=[self.name], timeout=1.0)
        held: dict[str, list[str]] = {}
        for state, method in (
            ("active", inspect.active),
            ("reserved", inspect.reserved),
            ("scheduled", inspect.scheduled),
        ):
            reply = (method() or {}).get(self.name)
            if reply is None:
                return None
            held[state] = [
                str(task.get("name") or task.get("request", {}).get("name")) for task in reply
            ]
        return held

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


def describe_flow(worker: Worker) -> str:
    """What a stuck wait on the event flow was looking at: the outbox, the
    relay's wake-up flag, the queues, the worker and the end of its log."""
    from eventing.models import OutboxMessage, RelayWake

    rows = OutboxMessage.objects.all()
    failing = rows.exclude(last_error="")
    wake = RelayWake.objects.filter(id=1).values_list("requested", flat=True).first()
    alive = worker.proc is not None and worker.proc.poll() is None
    parts = [
        f"outbox: {rows.count()} rows, {failing.count()} failing"
        + (
            f" (last error: {failing.values_list('last_error', flat=True).first()!r})"
            if failing.exists()
            else ""
        ),
        f"relay wake-up flag: {'missing' if wake is None else 'set' if wake else 'clear'}",
        f"queues: {queue_depths()}",
        f"worker: {'running' if alive else 'not running'}, holds {worker.held_tasks()}",
        f"worker log ({worker.log_path}), last lines:",
        worker.log_tail(),
    ]
    return "\n".join(parts)


def relay_once() -> int:
    """Run the relay in this process until the outbox is drained."""
    from eventing import relay

    return relay.relay(max_seconds=30).published_rows
