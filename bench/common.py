"""Shared pieces: results, statistics, database fills, queues, workers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import amqp
from django.apps import apps
from django.conf import settings
from django.db import connection, transaction

from .env import APP_QUEUES, QUEUE_PREFIX, RESULTS_DIR, ROOT, bench_environ

BENCH_APPS = ("eventing", "orders", "inventory", "notifications")
# The relay's batch size: the raw baselines publish in batches of the same size.
RELAY_BATCH = int(os.environ.get("EVENTING_RELAY_BATCH_SIZE", "500"))


# -- results ---------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One benchmark's entry in latest.json."""

    name: str
    value: float | None
    baseline: float | None
    unit: str
    baseline_unit: str
    target: str
    met: bool | None
    runs: list[Any]
    baseline_runs: list[Any]
    ratio: float | None = None
    status: str = "measured"
    what: str = ""
    baseline_what: str = ""
    sizes: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (no interpolation): a real sample."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-pct * len(ordered) // 100)))  # ceil
    return ordered[min(rank, len(ordered)) - 1]


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- database --------------------------------------------------------------------


def bench_tables(exclude: Iterable[str] = ("eventing_relaywake",)) -> list[str]:
    skip = set(exclude)
    return [
        model._meta.db_table
        for label in BENCH_APPS
        for model in apps.get_app_config(label).get_models()
        if not model._meta.proxy and model._meta.managed and model._meta.db_table not in skip
    ]


def drop_pooled_broker_connections() -> None:
    """Close this process's pooled Celery broker connections. This process
    sends no heartbeats while it waits, so after a long measurement the broker
    may have dropped them, and the next on-commit relay wake (sent with
    retry=False) would fail once, and the relay's publisher would fail a batch
    and back off: a measurement must not start with that."""
    from kombu import pools as kombu_pools

    from config.celery import app
    from eventing import relay

    # What kombu and Celery do after a fork: reset kombu's global pools and
    # drop the app's references, so the next publish opens a new connection.
    kombu_pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
    # The relay's own confirm-mode connection, idle since the last benchmark
    # that relayed: close it so the next publish connects afresh.
    relay.get_publisher().close()


T = TypeVar("T")


def retried(func: Callable[[], T], what: str, pause: float = 10.0) -> T:
    """Run one repetition; if the broker or the database drops it (another
    session's fault-injection test may stop RabbitMQ for a few seconds), log
    it, reconnect and run it once more."""
    try:
        return func()
    except Exception as exc:
        log(f"{what} failed ({type(exc).__name__}: {exc}); retrying once in {pause:g}s")
        time.sleep(pause)
        drop_pooled_broker_connections()
        return func()


def reset_database() -> None:
    """Empty every table of the platform and the apps (TRUNCATE: the store's
    immutability trigger covers UPDATE and DELETE only), and start with fresh
    broker connections."""
    drop_pooled_broker_connections()
    tables = ", ".join(bench_tables())
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        cursor.execute(
            "INSERT INTO eventing_relaywake (id, requested) VALUES (1, false) "
            "ON CONFLICT (id) DO UPDATE SET requested = false"
        )
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS bench_stamp (seq bigint, latency double precision)"
        )
        cursor.execute("TRUNCATE bench_stamp")


def analyze(*tables: str) -> None:
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"ANALYZE {table}")


def count(table: str, where: str = "") -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table} {where}")
        return int(cursor.fetchone()[0])


def scalar(sql: str, params: Sequence[Any] = ()) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return row[0] if row else None


# OrderPlaced v2 events as the service writes them: an order of three lines, a
# correlation id, a W3C traceparent and an actor. About 560 bytes of envelope
# on the wire, ~900 bytes as a Celery task message.
_FILL_EVENTS_SQL = """
INSERT INTO eventing_storedevent (
    event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload,
    source, time, correlation_id, causation_id, traceparent, actor, chain_depth)
SELECT s.id, 'orders.Order', s.id::text, 1, 'orders.OrderPlaced', 2,
    jsonb_build_object(
        'order_id', s.id::text,
        'customer_id', 1 + mod(s.g, 997),
        'lines', jsonb_build_array(
            jsonb_build_object('sku', 'SKU-' || lpad((mod(s.g, 89))::text, 4, '0'),
                               'quantity', 1 + mod(s.g, 3), 'unit_price', '12.50'),
            jsonb_build_object('sku', 'SKU-' || lpad((mod(s.g, 89) + 89)::text, 4, '0'),
                               'quantity', 1 + mod(s.g, 5), 'unit_price', '7.25'),
            jsonb_build_object('sku', 'SKU-' || lpad((mod(s.g, 89) + 178)::text, 4, '0'),
                               'quantity', 2, 'unit_price', '104.00')),
        'total', '253.75',
        'currency', 'EUR'),
    '/eventflow', now(), gen_random_uuid()::text, '',
    '00-' || md5(s.id::text) || '-' || substr(md5(s.g::text), 1, 16) || '-01',
    'user:' || (1 + mod(s.g, 997)), 0
FROM (SELECT g, gen_random_uuid() AS id FROM generate_series(1, %s) AS g) AS s
"""


def fill_events(n: int, chunk: int = 500_000, progress: bool = False) -> None:
    """Append `n` OrderPlaced events (one-event streams) with plain SQL."""
    done = 0
    started = time.monotonic()
    while done < n:
        size = min(chunk, n - done)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit = off")
            cursor.execute(_FILL_EVENTS_SQL, [size])
        done += size
        if progress:
            log(f"  store fill {done:,}/{n:,} ({time.monotonic() - started:.0f}s)")


def fill_outbox_latest(n_events: int, consumers: Sequence[str] = ("",)) -> int:
    """Queue the newest `n_events` stored events in the outbox, one row per
    (event, consumer); consumer '' means every subscriber."""
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE eventing_outboxmessage RESTART IDENTITY")
        for consumer in consumers:
            cursor.execute(
                "INSERT INTO eventing_outboxmessage "
                "(event_id, consumer, created_at, available_at, attempts, last_error) "
                "SELECT position, %s, now(), now(), 0, '' FROM eventing_storedevent "
                "ORDER BY position DESC LIMIT %s",
                [consumer, n_events],
            )
    analyze("eventing_outboxmessage")
    return count("eventing_outboxmessage")


# -- broker ----------------------------------------------------------------------


def queue_name(name: str) -> str:
    return f"{QUEUE_PREFIX}{name}"


def broker_connection() -> amqp.Connection:
    from kombu.utils.url import url_to_parts

    _scheme, host, port, user, password, vhost, _ = url_to_parts(settings.CELERY_BROKER_URL)
    deadline = time.monotonic() + 60
    while True:
        conn = amqp.Connection(
            host=f"{host or '127.0.0.1'}:{port or 5672}",
            userid=user or "guest",
            password=password or "guest",
            virtual_host=vhost or "/",
            connect_timeout=5,
        )
        try:
            conn.connect()
            return conn
        except OSError as exc:
            # The broker may be briefly down (a fault-injection test elsewhere).
            if time.monotonic() > deadline:
                raise
            log(f"broker not reachable ({exc}); retrying")
            time.sleep(2)


def declare_queues() -> None:
    from kombu import Connection

    from config.celery import app

    with Connection(settings.CELERY_BROKER_URL) as conn:
        channel = conn.channel()
        for queue in app.conf.task_queues:
            queue.bind(channel).declare()


def purge_queues(names: Sequence[str] = APP_QUEUES) -> None:
    declare_queues()
    conn = broker_connection()
    try:
        channel = conn.channel()
        for name in names:
            channel.queue_purge(queue_name(name))
    finally:
        conn.close()


def queue_depths(names: Sequence[str] = APP_QUEUES) -> dict[str, int]:
    conn = broker_connection()
    try:
        channel = conn.channel()
        depths = {}
        for name in names:
            _, ready, _ = channel.queue_declare(queue_name(name), passive=True)
            depths[name] = ready
        return depths
    finally:
        conn.close()


def wait_queue_depth(name: str, expected: int, timeout: float = 60.0) -> None:
    """Publisher confirms mean enqueued; this waits until the queue reports it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if queue_depths([name])[name] >= expected:
            return
        time.sleep(0.1)
    raise RuntimeError(f"queue {queue_name(name)} did not reach {expected} messages")


@dataclasses.dataclass
class RawMessage:
    routing_key: str
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]


def task_message(task_name: str, args: tuple[Any, ...], routing_key: str) -> RawMessage:
    """A Celery protocol-2 task message, serialized the way the relay does it."""
    import uuid

    from kombu.serialization import dumps

    from config.celery import app

    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task_name, args=args, kwargs={})
    content_type, encoding, data = dumps(message.body, serializer="json")
    return RawMessage(
        routing_key=routing_key,
        body=data if isinstance(data, bytes) else data.encode(),
        content_type=content_type,
        content_encoding=encoding,
        headers=message.headers,
        properties={"correlation_id": task_id},
    )


class RawPublisher:
    """Plain py-amqp: confirm_select, publish a batch, wait for the acks.

    The baseline for the relay: the same bodies, headers and flags
    (persistent, mandatory), nothing else.
    """

    def __init__(self) -> None:
        self.conn = broker_connection()
        self.channel = self.conn.channel()
        self.channel.confirm_select()
        self.settled = 0  # highest delivery tag acked or nacked
        self.nacked = 0
        self.sent = 0
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self.settled = max(self.settled, delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self.settled = max(self.settled, delivery_tag)
        self.nacked += 1

    def publish(self, messages: Sequence[RawMessage], batch: int) -> float:
        """Publish everything in confirm-waited batches; return seconds."""
        started = time.perf_counter()
        for offset in range(0, len(messages), batch):
            for msg in messages[offset : offset + batch]:
                self.sent += 1
                self.channel._basic_publish(
                    amqp.Message(
                        msg.body,
                        content_type=msg.content_type,
                        content_encoding=msg.content_encoding,
                        application_headers=msg.headers,
                        delivery_mode=2,
                        message_id=str(self.sent),
                        **msg.properties,
                    ),
                    exchange="",
                    routing_key=msg.routing_key,
                    mandatory=True,
                )
            while self.settled < self.sent:
                self.conn.drain_events(timeout=30)
        if self.nacked:
            raise RuntimeError(f"broker nacked {self.nacked} messages")
        return time.perf_counter() - started

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: S110 - best effort at teardown
            pass


# -- workers ---------------------------------------------------------------------


_live_workers: list[_BenchProcess] = []


# The relay as `make run` deploys it, for the relay process and the worker
# (whose handlers' commits wake the relay process by NOTIFY too).
RELAY_PROCESS_ENV = {"EVENTING_RELAY_WAKE": "notify"}


class _BenchProcess:
    """A bench subprocess in a session of its own, registered in `_live_workers`
    while it runs. Stopping sends SIGTERM to the main process only (a worker's
    warm shutdown: the pool children finish their task and prefetched messages
    go back; the relay process ends after its run under way), then SIGKILL to
    the whole session after `timeout`."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path

    def start(self, timeout: float = 60.0) -> Self:
        raise NotImplementedError

    def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        """Start `argv` from the checkout in a new session, output appended to the log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _live_workers.append(self)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self in _live_workers:
            _live_workers.remove(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BenchWorker(_BenchProcess):
    """A `celery worker` subprocess with the bench environment (prefork, -c 2)."""

    def __init__(
        self,
        queues: Sequence[str],
        *,
        concurrency: int = 2,
        log_name: str = "worker",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.queues = [queue_name(q) for q in queues]
        self.concurrency = concurrency
        self.extra_env = extra_env or {}
        self.name = f"bench-{log_name}-{os.getpid()}@localhost"
        self.log_path = RESULTS_DIR / f"{log_name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> BenchWorker:
        env = {**os.environ, **bench_environ(), **self.extra_env}
        self._spawn(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-Q",
                ",".join(self.queues),
                "-c",
                str(self.concurrency),
                "-n",
                self.name,
                "-I",
                "bench.tasks",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                os.environ.get("BENCH_WORKER_LOGLEVEL", "warning"),
            ],
            env,
        )
        self.wait_ready(timeout)
        return self

    def _control(self, command: str, **kwargs: Any) -> list[dict[str, Any]]:
        """A remote-control broadcast to this worker on a fresh connection: the
        app's pooled one may have been dropped by the broker during a long
        measurement (no heartbeats while this process waits)."""
        from config.celery import app

        with app.connection_for_write() as conn:
            method = getattr(app.control, command)
            return method(destination=[self.name], connection=conn, **kwargs) or []

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}; see {self.log_path}")
            replies = self._control("ping", timeout=0.5)
            if any(self.name in reply for reply in replies):
                return
        raise RuntimeError(f"worker did not answer ping in {timeout}s; see {self.log_path}")

    def add_consumer(self, queue: str) -> None:
        replies = self._control("add_consumer", queue=queue_name(queue), reply=True, timeout=5.0)
        if not replies:
            raise RuntimeError(f"worker did not confirm consuming {queue}")

    def cancel_consumer(self, queue: str) -> None:
        self._control("cancel_consumer", queue=queue_name(queue), reply=True, timeout=5.0)

    def pids(self) -> list[int]:
        """The main process and its pool children (and theirs)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]


class BenchRelayProcess(_BenchProcess):
    """`manage.py relay_outbox --loop` with the bench environment and
    EVENTING_RELAY_WAKE=notify: the relay process a commit wakes by NOTIFY."""

    def __init__(self, log_name: str = "relay") -> None:
        self.name = f"relay process ({log_name})"
        self.log_path = RESULTS_DIR / f"{log_name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> BenchRelayProcess:
        from eventing.relay import WAKE_CHANNEL

        self._spawn(
            [sys.executable, "manage.py", "relay_outbox", "--loop", "--interval", "1"],
            {**os.environ, **bench_environ(), **RELAY_PROCESS_ENV},
        )

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the relay process exited; see {self.log_path}")
            # Its listener's last statement; only this process listens here.
            return bool(
                scalar(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query = %s",
                    [f"LISTEN {WAKE_CHANNEL}"],
                )
            )

        wait_until(listening, timeout=timeout, interval=0.1, what="the relay process to LISTEN")
        return self

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid]


@contextlib.contextmanager
def relay_woken(mode: str, log_name: str) -> Iterator[BenchRelayProcess | None]:
    """This process's commits wake the relay the `mode` way ("notify" or
    "celery"; the setting is read at each wake-up), and for "notify" a relay
    process runs, as `make run` deploys it."""
    saved = settings.EVENTING["RELAY_WAKE"]
    settings.EVENTING["RELAY_WAKE"] = mode
    try:
        if mode == "notify":
            with BenchRelayProcess(log_name=log_name) as process:
                yield process
        else:
            yield None
    finally:
        settings.EVENTING["RELAY_WAKE"] = saved


def stop_all_workers() -> None:
    for worker in list(_live_workers):
        try:
            worker.stop(timeout=10)
        except Exception as exc:
            log(f"could not stop {worker.name}: {exc}")


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.05, what: str = ""
) -> float:
    """Poll until true; return the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- memory ----------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """Every live descendant of `root`, from the parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return sorted(found)


def rss_bytes(pid: int) -> int:
    """VmRSS from /proc (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


# -- profiling -------------------------------------------------------------------

PROFILE_DIR: Path | None = None  # set by --profile


def profile_in_process(name: str, func: Callable[[], Any]) -> Any:
    """Run `func` under pyinstrument when --profile is on; write the report."""
    if PROFILE_DIR is None:
        return func()
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    profiler.start()
    try:
        return func()
    finally:
        profiler.stop()
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        path = PROFILE_DIR / f"{name}.pyinstrument.txt"
        path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        log(f"  profile written to {path}")


class PySpy:
    """`py-spy record` on worker processes when --profile is on (raw collapsed
    stacks, summarised by bench.profile_summary)."""

    def __init__(self, name: str, pids: Sequence[int], seconds: float) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        if PROFILE_DIR is None:
            return
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("py-spy")
        for pid in pids:
            out = PROFILE_DIR / f"{name}.{pid}.collapsed"
            self.procs.append(
                subprocess.Popen(
                    [
                        str(exe),
                        "record",
                        "--pid",
                        str(pid),
                        "--format",
                        "raw",
                        "--rate",
                        "200",
                        "--duration",
                        str(int(seconds) + 1),
                        "--nonblocking",
                        "--output",
                        str(out),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
