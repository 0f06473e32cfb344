from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection

from eventing.models import OutboxMessage

from .support import Worker, describe_flow, purge_queues, queue_depths, wait_for


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Per test session (named by its queue prefix), so two sessions on one
    machine never count each other's mails or read each other's logs."""
    from django.conf import settings

    session = settings.EVENTING_QUEUE_PREFIX.strip(".") or "default"
    path = Path(__file__).resolve().parent.parent / "test-artifacts" / session
    (path / "mail").mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def celery_worker(
    django_db_setup: None, django_db_blocker: pytest.FixtureRequest, artifacts_dir: Path
) -> Iterator[Worker]:
    """One real Celery worker for the session, on the test database and the
    test-prefixed queues (all four: orders, inventory, notifications, relay)."""
    with django_db_blocker.unblock():
        database_name = connection.settings_dict["NAME"]
    purge_queues()
    worker = Worker(database_name, artifacts_dir / "worker.log")
    worker.start()
    yield worker
    worker.stop()


def wait_until_quiet(worker: Worker, timeout: float = 60.0) -> None:
    """The flow has settled: nothing in the outbox, on the queues, or in the worker."""

    def quiet_now() -> bool:
        if OutboxMessage.objects.exists():
            return False
        if any(queue_depths().values()):
            return False
        return not worker.busy()

    # The three looks are not one snapshot: a task that ends between the
    # queues' look and the worker's may just have published the next
    # message (a notifications batch after its handler's commit), which the
    # worker has not yet fetched. Quiet counts only when seen three times in
    # a row.
    seen = [0]

    def quiet() -> bool:
        seen[0] = seen[0] + 1 if quiet_now() else 0
        return seen[0] >= 3

    wait_for(
        quiet,
        timeout=timeout,
        interval=0.2,
        what="the event flow to settle",
        explain=lambda: describe_flow(worker),
    )


@pytest.fixture
def live(transactional_db: None, celery_worker: Worker) -> Iterator[Worker]:
    """The real flow: committed rows, a real worker, the relay woken on commit.

    Waits for the flow to settle before the database is flushed, so one test's
    messages never land in the next test's tables.
    """
    yield celery_worker
    if celery_worker.extra_env:
        celery_worker.restart()  # back to the default configuration
    elif celery_worker.proc is None or celery_worker.proc.poll() is not None:
        celery_worker.start()
    wait_until_quiet(celery_worker)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A live test that fails carries the state of the event flow at that
    moment (outbox, wake-up flag, queues, worker, its log): the worker's log
    of a CI run does not outlive the run's checkout."""
    report = yield
    worker = getattr(item, "funcargs", {}).get("celery_worker")
    if report.failed and call.when in ("setup", "call") and isinstance(worker, Worker):
        try:
            state = describe_flow(worker)
        except Exception as exc:
            state = f"(could not describe the state: {type(exc).__name__}: {exc})"
        report.sections.append(("event flow at the failure", state))
    return report
