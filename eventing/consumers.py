"""The consumer runtime: handler registry, checkpoints, retries, dead letters.

A consumer is a business app's set of handlers. It runs as one Celery task
(`<consumer>.handle_event`) on its own queue. Per message, in one transaction:

    lock the lane's checkpoint (consumer, aggregate)
    parked                       -> the lane waits for a redrive; ack
    version <= checkpoint        -> duplicate; count it and ack
    otherwise                    -> load versions checkpoint+1..version from the
                                    store, apply handlers in version order,
                                    advance the checkpoint
    COMMIT, then ack (acks_late)

The store, not the broker, defines order: a message that arrives early makes
the consumer catch up from the store, and the late ones become duplicates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import traceback as tb
import uuid
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction

from . import context, observe
from .events import DomainEvent, UnknownEventType, UnknownEventVersion
from .events import registry as event_registry
from .models import Checkpoint, DeadLetter, OutboxMessage, StoredEvent
from .rows import BatchedRows, Statement, take_dirty, unit_of_work
from .store import ChainDepthExceeded

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EventMeta:
    """What a handler may know about the event besides its payload."""

    event_id: str
    event_type: str
    position: int
    aggregate_type: str
    aggregate_id: str
    version: int
    time: dt.datetime
    correlation_id: str
    causation_id: str
    actor: str
    consumer: str
    replaying: bool = False

    @classmethod
    def of(cls, row: Any, *, consumer: str, replaying: bool = False) -> EventMeta:
        """`row`: a StoredEvent, or a row with its attributes (replay's EventRow).

        Built once per event and handler (a million times in a rebuild): a
        frozen dataclass's __init__ sets each of its twelve fields through
        object.__setattr__, which cost 5-8% of a rebuild's fold; the
        instance's dict is filled in one call instead. Every field is set
        here (a test holds this to `dataclasses.fields`)."""
        meta = object.__new__(cls)
        meta.__dict__.update(
            event_id=str(row.event_id),
            event_type=row.event_type,
            position=row.position,
            aggregate_type=row.aggregate_type,
            aggregate_id=row.aggregate_id,
            version=row.version,
            time=row.time,
            correlation_id=row.correlation_id,
            causation_id=row.causation_id,
            actor=row.actor,
            consumer=consumer,
            replaying=replaying,
        )
        return meta


Handler = Callable[[Any, EventMeta], None]


@dataclasses.dataclass(frozen=True)
class HandlerSpec:
    event_name: str
    func: Handler
    # Declares effects that leave the database (email, HTTP). They must go
    # through `after_commit()`, which replay turns into a no-op.
    side_effects: bool = False
    # The projection whose read models this handler writes. None marks a
    # policy (it reacts with commands and new events): replay never runs it.
    projection: str | None = None

    @property
    def qualname(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"


@dataclasses.dataclass(frozen=True)
class ReadModel:
    """A table a projection owns and can rebuild from the store.

    `key_field` holds the aggregate id its rows derive from (so one
    aggregate's rows can be rebuilt alone); None when a row depends on many
    streams, which forces a full rebuild. `natural_key` identifies a row when
    diffing (surrogate ids differ after a rebuild); `compare_exclude` lists
    delivery bookkeeping that is not derived from events.
    """

    model: type[Any]
    key_field: str | None
    natural_key: tuple[str, ...] = ("pk",)
    compare_exclude: tuple[str, ...] = ()
    # Set when the handlers go through `rows.get/put` (eventing.rows): the
    # runtime then prefetches a batch's rows and writes them in one statement.
    rows: BatchedRows | None = None

    @property
    def label(self) -> str:
        return self.model._meta.label


@dataclasses.dataclass
class Projection:
    """A named read-model builder: its handlers and the tables they write."""

    name: str
    read_models: list[ReadModel]
    consumer: str = ""

    @property
    def partial_rebuild_possible(self) -> bool:
        return all(rm.key_field for rm in self.read_models)

    @property
    def batched_rows(self) -> list[BatchedRows]:
        return [rm.rows for rm in self.read_models if rm.rows is not None]


@dataclasses.dataclass(frozen=True)
class BatchPreparer:
    event_names: frozenset[str]
    func: Callable[[list[DomainEvent]], None]


@dataclasses.dataclass
class ConsumerSpec:
    name: str
    handlers: dict[str, list[HandlerSpec]] = dataclasses.field(default_factory=dict)
    # Run once per live batch before its handlers (see `before_batch`).
    preparers: list[BatchPreparer] = dataclasses.field(default_factory=list)

    @property
    def queue_name(self) -> str:
        return f"{settings.EVENTING['QUEUE_PREFIX']}{self.name}"

    @property
    def task_name(self) -> str:
        return f"{self.name}.handle_event"

    def batched_rows_by_type(self) -> dict[str, list[BatchedRows]]:
        """Event type -> the batched read models its handlers here write."""
        by_type: dict[str, list[BatchedRows]] = {}
        for event_name, specs in self.handlers.items():
            for handler in specs:
                if handler.projection is None:
                    continue
                for rows in registry.projection(handler.projection).batched_rows:
                    if rows not in by_type.setdefault(event_name, []):
                        by_type[event_name].append(rows)
        return by_type


class ConsumerRegistry:
    def __init__(self) -> None:
        self._consumers: dict[str, ConsumerSpec] = {}
        # Names of events subscribed to that are not registered: the system
        # check reports them (registration order makes raising here fragile).
        self.unknown_subscriptions: list[str] = []
        self.projections: dict[str, Projection] = {}

    def declare(self, name: str) -> ConsumerSpec:
        return self._consumers.setdefault(name, ConsumerSpec(name))

    def get(self, name: str) -> ConsumerSpec:
        try:
            return self._consumers[name]
        except KeyError:
            raise LookupError(
                f"unknown consumer {name!r}; known: {', '.join(sorted(self._consumers)) or 'none'}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._consumers

    def all(self) -> list[ConsumerSpec]:
        return [self._consumers[k] for k in sorted(self._consumers)]

    def subscribers_of(self, event_name: str) -> list[str]:
        return [c.name for c in self.all() if event_name in c.handlers]

    def add(self, consumer: str, spec: HandlerSpec) -> None:
        self.declare(consumer).handlers.setdefault(spec.event_name, []).append(spec)

    def add_projection(self, consumer: str, projection: Projection) -> None:
        if projection.consumer and projection.consumer != consumer:
            raise ValueError(
                f"projection {projection.name} belongs to {projection.consumer}, not {consumer}"
            )
        projection.consumer = consumer
        self.projections[projection.name] = projection

    def projection(self, name: str) -> Projection:
        try:
            return self.projections[name]
        except KeyError:
            raise LookupError(
                f"unknown projection {name!r}; known: {', '.join(sorted(self.projections))}"
            ) from None

    def projections_of(self, consumer: str) -> list[Projection]:
        return [p for _, p in sorted(self.projections.items()) if p.consumer == consumer]


registry = ConsumerRegistry()


def _consumer_of(func: Callable[..., Any], consumer: str | None) -> str:
    """`consumer`, or else the label of the app that defines `func`."""
    if consumer is not None:
        return consumer
    app_config = apps.get_containing_app_config(func.__module__)
    if app_config is None:
        raise LookupError(f"{func.__module__} is in no installed app; pass consumer=")
    return app_config.label


def subscribe(
    event_cls: type[DomainEvent] | str,
    *,
    consumer: str | None = None,
    side_effects: bool = False,
    projection: Projection | None = None,
) -> Callable[[Handler], Handler]:
    """Register a handler. The consumer defaults to the app that defines it.

    With `projection`, the handler builds that projection's read models and
    replay reruns it; without, it is a policy that replay never reruns.
    """

    def decorator(func: Handler) -> Handler:
        name = _consumer_of(func, consumer)
        event_name = event_cls if isinstance(event_cls, str) else event_cls.name
        if event_name not in event_registry:
            registry.unknown_subscriptions.append(
                f"{func.__module__}.{func.__qualname__} subscribes to unknown event {event_name!r}"
            )
        if projection is not None:
            registry.add_projection(name, projection)
        registry.add(
            name,
            HandlerSpec(event_name, func, side_effects, projection.name if projection else None),
        )
        return func

    return decorator


def before_batch(
    *event_classes: type[DomainEvent], consumer: str | None = None
) -> Callable[[Callable[[list[Any]], None]], Callable[[list[Any]], None]]:
    """Register `func(events)`, run once per live batch, in its transaction,
    before any handler, with the batch's events of these types (decoded, in
    store order; none, it is not called).

    For what one query can do for the whole batch that the handlers would do
    event by event: typically, locking in one consistent order the rows the
    handlers will lock. Without it, two batches that lock the same rows in
    different orders wait on each other until the batch lock timeout, and
    both fall back to lane-by-lane transactions. Replay does not run it.
    """

    def decorator(func: Callable[[list[Any]], None]) -> Callable[[list[Any]], None]:
        name = _consumer_of(func, consumer)
        registry.declare(name).preparers.append(
            BatchPreparer(frozenset(cls.name for cls in event_classes), func)
        )
        return func

    return decorator


def _prepare_batch(spec: ConsumerSpec, rows: Sequence[StoredEvent]) -> None:
    """Run the consumer's `before_batch` functions. One that fails fails like
    a handler, on the first of its events: the batch is rolled back and
    applied lane by lane, where only the lane whose events make it fail is
    retried or dead-lettered. A lock timeout stays an OperationalError, which
    sends the batch lane by lane too."""
    for preparer in spec.preparers:
        events, sources = [], []
        for row in rows:
            if row.event_type not in preparer.event_names:
                continue
            try:
                events.append(
                    event_registry.decode(row.event_type, row.schema_version, row.payload)
                )
            except (UnknownEventType, UnknownEventVersion, ValueError, TypeError):
                continue  # its handler fails it, with the reason, in order
            sources.append(row)
        if not events:
            continue
        try:
            preparer.func(events)
        except OperationalError:
            raise
        except Exception as exc:
            raise HandlerFailed(sources[0], exc) from exc


def after_commit(func: Callable[[], None]) -> None:
    """Run an outside effect (email, HTTP) once the current transaction commits.

    Inside a handler, only one declared with `side_effects=True` may call it,
    so `eventing_topology` shows every handler that leaves the database. Replay
    runs such handlers for their database writes and drops these effects: a
    rebuilt read model never resends an email.
    """
    ctx = context.current()
    if ctx.in_handler and not ctx.side_effects:
        raise RuntimeError(
            "after_commit() called from a handler not declared with "
            "@subscribe(..., side_effects=True)"
        )
    if ctx.replaying:
        return
    transaction.on_commit(func)


# -- processing -----------------------------------------------------------------


class ConsumerPaused(Exception):
    """The consumer is paused (a replay is rebuilding it): try again later."""


def consumer_lock_key(consumer: str) -> int:
    """The advisory-lock key of a consumer: live transactions hold it shared,
    a replay takes it exclusively to wait them out (see eventing.replay)."""
    return (0x45564E54 << 32) | zlib.crc32(consumer.encode())


class PermanentFailure(Exception):
    """Retrying cannot help (unknown type or version, malformed message)."""


class HandlerFailed(Exception):
    """A handler raised while applying `event` (maybe a caught-up one)."""

    def __init__(self, event: StoredEvent, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.event = event
        self.error = error
        self.permanent = isinstance(
            error, PermanentFailure | UnknownEventType | UnknownEventVersion | ChainDepthExceeded
        )
        self.traceback = "".join(tb.format_exception(error))


@dataclasses.dataclass
class Delivered:
    """One parsed message: the event it names and the message itself."""

    aggregate_type: str
    aggregate_id: str
    version: int
    event_id: str
    message: Any


@dataclasses.dataclass
class Lane:
    """The messages of one batch for one (consumer, aggregate) lane."""

    aggregate_type: str
    aggregate_id: str
    delivered: list[Delivered]
    checkpoint_id: int = 0
    checkpoint_version: int = 0
    parked: bool = False
    created: bool = False  # its checkpoint row was created by this transaction
    fresh: list[Delivered] = dataclasses.field(default_factory=list)  # not duplicates
    duplicates: int = 0
    new_version: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.aggregate_type, self.aggregate_id)

    @property
    def messages(self) -> list[Any]:
        return [d.message for d in self.delivered]


@dataclasses.dataclass
class LaneFailure:
    """A lane that could not be applied: its messages and why."""

    messages: list[Any]
    error: HandlerFailed


@dataclasses.dataclass
class BatchOutcome:
    applied: int = 0  # events applied, caught-up ones included
    duplicates: int = 0  # messages at or below their lane's checkpoint
    parked: int = 0  # messages for a parked lane, left to its redrive
    # Messages that name no stored event, or no event at all: each becomes a
    # dead letter without an event (retrying cannot help).
    invalid: list[tuple[Any, PermanentFailure]] = dataclasses.field(default_factory=list)
    failed: list[LaneFailure] = dataclasses.field(default_factory=list)

    @property
    def status(self) -> str:
        if self.applied:
            return "applied"
        if self.duplicates:
            return "duplicate"
        if self.parked:
            return "parked"
        return "invalid" if self.invalid else "empty"

    def merge(self, other: BatchOutcome) -> None:
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.parked += other.parked
        self.invalid.extend(other.invalid)
        self.failed.extend(other.failed)


@dataclasses.dataclass
class Outcome:
    status: str  # applied | duplicate | parked | invalid
    applied: int = 0


_REQUIRED = ("id", "type", "aggregatetype", "aggregateid", "aggregateversion")


def parse_message(message: Any) -> tuple[str, str, int, str]:
    if not isinstance(message, dict):
        raise PermanentFailure(f"message body is {type(message).__name__}, not an event envelope")
    missing = [k for k in _REQUIRED if k not in message]
    if missing:
        raise PermanentFailure(f"message lacks {', '.join(missing)}")
    try:
        version = int(message["aggregateversion"])
        uuid.UUID(str(message["id"]))
    except (TypeError, ValueError) as exc:
        raise PermanentFailure(f"malformed envelope: {exc}") from exc
    if version < 1:
        raise PermanentFailure(f"aggregateversion {version} is not >= 1")
    return str(message["aggregatetype"]), str(message["aggregateid"]), version, str(message["id"])


def _raised(error: PermanentFailure) -> PermanentFailure:
    """`error` with a traceback, as the dead letter shows one."""
    try:
        raise error
    except PermanentFailure as exc:
        return exc


def lock_checkpoint(consumer: str, aggregate_type: str, aggregate_id: str) -> Checkpoint:
    """Caller holds a transaction; returns the lane's row locked FOR UPDATE."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO eventing_checkpoint "
            "(consumer, aggregate_type, aggregate_id, version, duplicates, parked, parked_reason,"
            " updated_at) VALUES (%s, %s, %s, 0, 0, false, '', now()) "
            "ON CONFLICT (consumer, aggregate_type, aggregate_id) DO NOTHING",
            [consumer, aggregate_type, aggregate_id],
        )
    return Checkpoint.objects.select_for_update().get(
        consumer=consumer, aggregate_type=aggregate_type, aggregate_id=aggregate_id
    )


# The start of a batch, in one round trip (each ~0.2-0.3 ms here, on every
# event's path). First statement: the consumer's lock, shared (a replay takes
# it exclusively to wait live transactions out), and with `lock_timeout` for
# the rest of the transaction. Second, in a snapshot taken after that lock:
# the lanes' checkpoints, created where missing ('c') or locked FOR UPDATE
# ('e'), and a 'p' row if a replay has paused the consumer. Both the insert
# and the lock go in (aggregate_type, aggregate_id) order, so two batches
# that share lanes wait for each other (or past the timeout step aside); a
# lane created by another batch meanwhile is the exception (see below).
_LOCK_CONSUMER_SQL = "SELECT pg_advisory_xact_lock_shared(%s);\n"
_LOCK_CONSUMER_WITH_TIMEOUT_SQL = (
    "SELECT set_config('lock_timeout', %s, true), pg_advisory_xact_lock_shared(%s);\n"
)
_LOCK_LANES_SQL = """
WITH wanted AS (
    SELECT l.t, l.i FROM unnest(%s::text[], %s::text[]) AS l(t, i)
), created AS (
    INSERT INTO eventing_checkpoint (
        consumer, aggregate_type, aggregate_id, version, duplicates, parked, parked_reason,
        updated_at)
    SELECT %s, w.t, w.i, 0, 0, false, '', now() FROM wanted w ORDER BY w.t, w.i
    ON CONFLICT (consumer, aggregate_type, aggregate_id) DO NOTHING
    RETURNING id, aggregate_type, aggregate_id, version, parked
), existing AS (
    SELECT c.id, c.aggregate_type, c.aggregate_id, c.version, c.parked
    FROM eventing_checkpoint c JOIN wanted w ON c.aggregate_type = w.t AND c.aggregate_id = w.i
    WHERE c.consumer = %s
    ORDER BY c.aggregate_type, c.aggregate_id
    FOR UPDATE OF c
)
SELECT 'c', id, aggregate_type, aggregate_id, version, parked FROM created
UNION ALL
SELECT 'e', id, aggregate_type, aggregate_id, version, parked FROM existing
UNION ALL
SELECT 'p', NULL, NULL, NULL, NULL, true FROM eventing_consumerstate
WHERE consumer = %s AND paused
"""
# A lane another transaction created after the statement's snapshot was
# taken (its insert then waited for that one to commit, and did nothing):
# a statement of its own sees the row. Rare, and taken out of key order.
_LOCK_LATE_LANES_SQL = """
SELECT c.id, c.aggregate_type, c.aggregate_id, c.version, c.parked
FROM eventing_checkpoint c
JOIN unnest(%s::text[], %s::text[]) AS l(t, i) ON c.aggregate_type = l.t AND c.aggregate_id = l.i
WHERE c.consumer = %s
ORDER BY c.aggregate_type, c.aggregate_id
FOR UPDATE OF c
"""


def lock_checkpoints(consumer: str, lanes: list[Lane], *, lock_timeout_ms: int = 0) -> None:
    """Caller holds a transaction. Takes the consumer's lock shared, fails with
    ConsumerPaused if a replay paused the consumer, creates the lanes'
    checkpoints that are missing and locks all of them FOR UPDATE, filling in
    their state: one round trip whatever the number of lanes (see
    _LOCK_LANES_SQL). A `lock_timeout_ms` holds for the rest of the
    transaction."""
    types = [lane.aggregate_type for lane in lanes]
    ids = [lane.aggregate_id for lane in lanes]
    lock_key = consumer_lock_key(consumer)
    if lock_timeout_ms > 0:
        sql, params = _LOCK_CONSUMER_WITH_TIMEOUT_SQL, [f"{lock_timeout_ms}ms", lock_key]
    else:
        sql, params = _LOCK_CONSUMER_SQL, [lock_key]
    found: dict[tuple[str, str], tuple[int, int, bool]] = {}
    created: set[tuple[str, str]] = set()
    with connection.cursor() as cursor:
        cursor.execute(sql + _LOCK_LANES_SQL, [*params, types, ids, consumer, consumer, consumer])
        for kind, pk, aggregate_type, aggregate_id, version, parked in cursor.fetchall():
            if kind == "p":
                raise ConsumerPaused(f"consumer {consumer} is paused")
            found[(aggregate_type, aggregate_id)] = (pk, version, parked)
            if kind == "c":
                created.add((aggregate_type, aggregate_id))
        late = [lane for lane in lanes if lane.key not in found]
        if late:
            # Out of key order: with other lanes already locked, waiting here
            # could deadlock with a batch that holds this lane and waits for
            # one of ours. NOWAIT fails instead (an OperationalError: the
            # batch goes lane by lane, or a single lane is retried).
            cursor.execute(
                _LOCK_LATE_LANES_SQL + (" NOWAIT" if found else ""),
                [
                    [lane.aggregate_type for lane in late],
                    [lane.aggregate_id for lane in late],
                    consumer,
                ],
            )
            for pk, aggregate_type, aggregate_id, version, parked in cursor.fetchall():
                found[(aggregate_type, aggregate_id)] = (pk, version, parked)
    for lane in lanes:
        lane.checkpoint_id, lane.checkpoint_version, lane.parked = found[lane.key]
        lane.created = lane.key in created


def _load_lane_events(lanes: list[Lane]) -> dict[tuple[str, str], list[StoredEvent]]:
    """Each lane's stored events after its checkpoint up to its highest
    delivered version, in one query, in version order per lane."""
    if not lanes:
        return {}
    rows = StoredEvent.objects.raw(
        "SELECT e.* FROM eventing_storedevent e "
        "JOIN unnest(%s::text[], %s::text[], %s::int[], %s::int[]) AS l(t, i, lo, hi) "
        "  ON e.aggregate_type = l.t AND e.aggregate_id = l.i "
        "  AND e.version > l.lo AND e.version <= l.hi "
        "ORDER BY e.position",
        [
            [lane.aggregate_type for lane in lanes],
            [lane.aggregate_id for lane in lanes],
            [lane.checkpoint_version for lane in lanes],
            [max(d.version for d in lane.fresh) for lane in lanes],
        ],
    )
    by_lane: dict[tuple[str, str], list[StoredEvent]] = {}
    for row in rows:
        by_lane.setdefault((row.aggregate_type, row.aggregate_id), []).append(row)
    return by_lane


def _save_checkpoints(lanes: list[Lane], rows_written: Sequence[Statement] = ()) -> None:
    """Move the lanes' checkpoints, in one round trip with the batched read
    models' row writes (`rows_written`): all of them are writes whose results
    nobody reads, and they commit together anyway."""
    changed = [lane for lane in lanes if lane.new_version or lane.duplicates]
    # A lane that only forged or corrupt messages named keeps no checkpoint:
    # nobody outside this transaction ever sees the row it created.
    unused = [
        lane.checkpoint_id
        for lane in lanes
        if lane.created and not (lane.new_version or lane.duplicates)
    ]
    statements = [(statement.sql, statement.params) for statement in rows_written]
    if unused:
        statements.append(("DELETE FROM eventing_checkpoint WHERE id = ANY(%s)", [unused]))
    if changed:
        statements.append(
            (
                "UPDATE eventing_checkpoint c "
                "SET version = GREATEST(c.version, u.v), duplicates = c.duplicates + u.d, "
                "    updated_at = now() "
                "FROM unnest(%s::bigint[], %s::int[], %s::int[]) AS u(id, v, d) "
                "WHERE c.id = u.id",
                [
                    [lane.checkpoint_id for lane in changed],
                    [lane.new_version for lane in changed],
                    [lane.duplicates for lane in changed],
                ],
            )
        )
    if statements:
        with connection.cursor() as cursor:
            cursor.execute(
                ";\n".join(sql for sql, _ in statements),
                [param for _, params in statements for param in params],
            )


def apply_event(spec: ConsumerSpec, row: StoredEvent, *, replaying: bool = False) -> None:
    """Run the consumer's handlers for one stored event. Caller holds the
    transaction (and, on the live path, the checkpoint lock); a handler that
    raises fails the whole transaction, which is rolled back."""
    if row.event_type not in event_registry:
        # Not merely "not subscribed": this process has never heard of the
        # type (a newer producer?). Skipping it could lose an effect a later
        # deploy would have applied, so it parks the lane instead.
        raise HandlerFailed(row, PermanentFailure(f"unknown event type {row.event_type!r}"))
    handlers = spec.handlers.get(row.event_type)
    if not handlers:
        return
    fail_switch = getattr(settings, "EVENTING_FAIL_CONSUMER", "")
    fail_only = getattr(settings, "EVENTING_FAIL_AGGREGATE", "")
    if fail_only and fail_only != row.aggregate_id:
        fail_switch = ""
    try:
        event = event_registry.decode(row.event_type, row.schema_version, row.payload)
    except (UnknownEventType, UnknownEventVersion, ValueError, TypeError) as exc:
        raise HandlerFailed(row, PermanentFailure(str(exc))) from exc
    meta = EventMeta.of(row, consumer=spec.name, replaying=replaying)
    with (
        context.scope(
            correlation_id=row.correlation_id,
            causation_id=str(row.event_id),
            actor=f"consumer:{spec.name}",
            traceparent=row.traceparent,
            chain_depth=row.chain_depth + 1,
            replaying=replaying,
        ),
        observe.applying(spec.name, row, replaying=replaying),  # [observability]
    ):
        for handler in handlers:
            try:
                if fail_switch and fail_switch == spec.name:
                    raise RuntimeError(
                        f"EVENTING_FAIL_CONSUMER={fail_switch}: this consumer fails (test switch)"
                    )
                # No savepoint per handler: a failure rolls back the whole
                # transaction (the batch, or in the fallback its one lane).
                with context.scope(in_handler=True, side_effects=handler.side_effects):
                    handler.func(event, meta)
            except HandlerFailed:
                raise
            except Exception as exc:
                raise HandlerFailed(row, exc) from exc


def _apply_lanes(
    spec: ConsumerSpec, lanes: list[Lane], *, lock_timeout_ms: int = 0
) -> BatchOutcome:
    """Apply the lanes' events in one transaction the caller holds.

    Raises HandlerFailed on the first failing handler (the caller rolls back),
    ConsumerPaused, or a database error. With `lock_timeout_ms`, any lock wait
    longer than that fails the transaction (see process_batch).
    """
    outcome = BatchOutcome()
    lock_checkpoints(spec.name, lanes, lock_timeout_ms=lock_timeout_ms)
    behind: list[Lane] = []
    for lane in lanes:
        lane.duplicates = lane.new_version = 0
        if lane.parked:
            outcome.parked += len(lane.delivered)
            continue
        # A duplicate: at or below the checkpoint, or a second copy in this batch.
        lane.fresh = []
        seen: set[tuple[int, str]] = set()
        for d in lane.delivered:
            if d.version > lane.checkpoint_version and (d.version, d.event_id) not in seen:
                seen.add((d.version, d.event_id))
                lane.fresh.append(d)
        lane.duplicates = len(lane.delivered) - len(lane.fresh)
        if lane.fresh:
            behind.append(lane)
    stored = _load_lane_events(behind)
    to_apply: list[StoredEvent] = []
    for lane in behind:
        rows = stored.get(lane.key, [])
        by_version = {row.version: row for row in rows}
        # Every delivered message must name a stored event exactly; one that
        # doesn't is forged or corrupt and is set aside alone.
        valid_top = 0
        for d in lane.fresh:
            row = by_version.get(d.version)
            if row is None or str(row.event_id) != d.event_id:
                outcome.invalid.append(
                    (
                        d.message,
                        _raised(
                            PermanentFailure(
                                f"message names event {d.event_id} at {d.aggregate_type}/"
                                f"{d.aggregate_id} v{d.version}, which is not in the event store"
                            )
                        ),
                    )
                )
            else:
                valid_top = max(valid_top, d.version)
        if not valid_top:
            continue
        expected = lane.checkpoint_version + 1
        lane_rows = [row for row in rows if row.version <= valid_top]
        if [row.version for row in lane_rows] != list(range(expected, valid_top + 1)):
            error = _raised(
                PermanentFailure(
                    f"store gap: {lane.aggregate_type}/{lane.aggregate_id} has versions "
                    f"{[row.version for row in lane_rows]} after checkpoint v{expected - 1}"
                )
            )
            outcome.invalid.extend((d.message, error) for d in lane.fresh)
            continue
        lane.new_version = valid_top
        to_apply.extend(lane_rows)
    # Global store order across lanes; per lane that is version order.
    to_apply.sort(key=lambda row: row.position)
    batched = spec.batched_rows_by_type()
    with unit_of_work() as uow:
        # Inside the unit of work: what a preparer locks and loads
        # (`rows.hold_locked`) is what the handlers then get.
        if to_apply and spec.preparers:
            _prepare_batch(spec, to_apply)
        prefetch_rows(batched, to_apply)
        for row in to_apply:
            apply_event(spec, row)
        rows_written = take_dirty(uow, {rows for per_type in batched.values() for rows in per_type})
    try:
        _save_checkpoints(lanes, rows_written)
    except DatabaseError as exc:
        if isinstance(exc, OperationalError | InterfaceError) or not to_apply:
            raise
        # The handlers' batched and deferred writes (eventing.rows) run here,
        # after the last handler: one that the database refuses (a CHECK, a
        # value out of range) fails like a handler would have, so the batch
        # goes lane by lane and only the lane whose writes fail is retried or
        # dead-lettered. Its last event stands for it.
        raise HandlerFailed(to_apply[-1], exc) from exc
    outcome.applied = len(to_apply)
    outcome.duplicates = sum(lane.duplicates for lane in lanes)
    for _ in range(outcome.duplicates):
        observe.duplicate_skipped(spec.name)  # [observability]
    return outcome


def prefetch_rows(batched: dict[str, list[BatchedRows]], events: Sequence[Any]) -> None:
    """Load, in one query per read model, the rows these events' handlers
    will get: each keyed by the id of the aggregate the event belongs to."""
    keys: dict[BatchedRows, set[str]] = {}
    for row in events:
        for rows in batched.get(row.event_type, ()):
            keys.setdefault(rows, set()).add(row.aggregate_id)
    for rows, wanted in keys.items():
        rows.prefetch(wanted)


def process_batch(consumer: str, messages: list[Any]) -> BatchOutcome:
    """Apply a batch of delivered messages.

    The fast path applies every lane in one transaction: one commit and a
    handful of statements for the whole batch besides the handlers' own. When
    a handler fails there, the batch is rolled back and each lane is applied
    in its own transaction, so one bad event holds back only its own lane;
    the failures come back in `failed` for the caller to retry or dead-letter.
    Raises ConsumerPaused or a database error that is nobody's fault (nothing
    of the batch is then committed by the fast path; in the fallback, lanes
    already committed become duplicates on retry).
    """
    spec = registry.get(consumer)
    outcome = BatchOutcome()
    lanes: dict[tuple[str, str], Lane] = {}
    for message in messages:
        try:
            aggregate_type, aggregate_id, version, event_id = parse_message(message)
        except PermanentFailure as exc:
            outcome.invalid.append((message, exc))
            continue
        lane = lanes.get((aggregate_type, aggregate_id))
        if lane is None:
            lane = lanes[(aggregate_type, aggregate_id)] = Lane(aggregate_type, aggregate_id, [])
        lane.delivered.append(Delivered(aggregate_type, aggregate_id, version, event_id, message))
    ordered = [lanes[key] for key in sorted(lanes)]
    if not ordered:
        return outcome
    # The fast path holds many lanes' rows (and the rows their handlers lock)
    # at once, so it must never be the one that waits: another batch, or a
    # user's request, may hold what it needs in another order, and a deadlock
    # would otherwise pick a victim among them. Past the timeout it steps
    # aside, and the lanes go one by one, each short and unhurried.
    timeout = settings.EVENTING["BATCH_LOCK_TIMEOUT_MS"] if len(ordered) > 1 else 0
    try:
        with transaction.atomic():
            outcome.merge(_apply_lanes(spec, ordered, lock_timeout_ms=timeout))
        return outcome
    except HandlerFailed as exc:
        if len(ordered) == 1:
            outcome.failed.append(LaneFailure(ordered[0].messages, exc))
            return outcome
    except OperationalError as exc:
        # Two batches that lock read-model rows in different orders can
        # deadlock; lane by lane they do not hold each other's rows long.
        if len(ordered) == 1 or not connection.is_usable():
            raise
        logger.info(
            "%s: batch of %d lanes failed (%s); lane by lane now", consumer, len(ordered), exc
        )
    for lane in ordered:
        try:
            with transaction.atomic():
                outcome.merge(_apply_lanes(spec, [lane]))
        except HandlerFailed as exc:
            outcome.failed.append(LaneFailure(lane.messages, exc))
    return outcome


def process_message(consumer: str, message: Any) -> Outcome:
    """Apply one delivered message. Raises HandlerFailed or PermanentFailure."""
    outcome = process_batch(consumer, [message])
    if outcome.invalid:
        raise outcome.invalid[0][1]
    if outcome.failed:
        raise outcome.failed[0].error
    return Outcome(outcome.status, applied=outcome.applied)


def retry_delay(attempt: int) -> float:
    """Exponential backoff with jitter, capped (keep it far below RabbitMQ's
    consumer_timeout: the countdown is held by the worker, unacked)."""
    conf = settings.EVENTING
    ceiling = min(conf["RETRY_MAX_SECONDS"], conf["RETRY_BASE_SECONDS"] * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def dead_letter(
    consumer: str,
    message: Any,
    error: str,
    traceback: str,
    attempts: int,
    event: StoredEvent | None,
) -> DeadLetter:
    """Record the failure and park the lane, in one transaction."""
    with transaction.atomic():
        if event is not None:
            lane = lock_checkpoint(consumer, event.aggregate_type, event.aggregate_id)
            lane.parked = True
            lane.parked_reason = error[:2000]
            lane.save(update_fields=["parked", "parked_reason", "updated_at"])
            existing = (
                DeadLetter.objects.select_for_update()
                .filter(consumer=consumer, event=event, status=DeadLetter.Status.OPEN)
                .first()
            )
            if existing is not None:
                existing.attempts = max(existing.attempts, attempts)
                existing.save(update_fields=["attempts"])
                return existing
        return DeadLetter.objects.create(
            consumer=consumer,
            event=event,
            message=message if isinstance(message, dict | list) else {"raw": repr(message)[:4000]},
            error=error,
            traceback=traceback,
            attempts=attempts,
        )


def redrive(dead: DeadLetter, *, by: str = "") -> None:
    """Unpark the lane and ask the consumer to catch it up to the stream head.

    The lane resumes in version order: the redriven event first, then every
    event that was parked behind it, all read from the store.
    """
    from django.utils import timezone

    with transaction.atomic():
        dead = DeadLetter.objects.select_for_update().get(pk=dead.pk)
        if dead.status != DeadLetter.Status.OPEN:
            raise ValueError(f"dead letter {dead.pk} is {dead.status}, not open")
        dead.status = DeadLetter.Status.REDRIVEN
        dead.resolved_at = timezone.now()
        dead.resolved_by = by
        dead.save(update_fields=["status", "resolved_at", "resolved_by"])
        if dead.event is None:
            return
        event = dead.event
        Checkpoint.objects.filter(
            consumer=dead.consumer,
            aggregate_type=event.aggregate_type,
            aggregate_id=event.aggregate_id,
        ).update(parked=False, parked_reason="")
        head = (
            StoredEvent.objects.filter(
                aggregate_type=event.aggregate_type, aggregate_id=event.aggregate_id
            )
            .order_by("-version")
            .first()
        )
        OutboxMessage.objects.create(event=head or event, consumer=dead.consumer)
        from .store import schedule_relay_wake

        schedule_relay_wake()


def discard(dead: DeadLetter, *, reason: str, by: str = "") -> None:
    """Close a dead letter without applying it. The lane stays parked: skipping
    an event would break per-aggregate order, so un-parking is a redrive."""
    from django.utils import timezone

    if not reason.strip():
        raise ValueError("discarding a dead letter needs a reason")
    with transaction.atomic():
        dead = DeadLetter.objects.select_for_update().get(pk=dead.pk)
        if dead.status != DeadLetter.Status.OPEN:
            raise ValueError(f"dead letter {dead.pk} is {dead.status}, not open")
        dead.status = DeadLetter.Status.DISCARDED
        dead.resolved_at = timezone.now()
        dead.resolved_by = by
        dead.resolution_note = reason
        dead.save(update_fields=["status", "resolved_at", "resolved_by", "resolution_note"])


def _transient_database_error(consumer: str, exc: BaseException) -> None:
    logger.warning(
        "%s: database connection lost (%s), retrying: %s", consumer, type(exc).__name__, exc
    )
    # A broken connection stays broken inside this worker process until
    # closed; the retry then opens a fresh one.
    connection.close()


def consumer_task(consumer: str) -> Any:
    """Create the Celery task `<consumer>.handle_event`, bound to its queue.

    Each business app calls this once in its `tasks.py`, so the task name is
    explicit and stable whatever module layout changes come later. Its
    argument is one event envelope, or a list of them (the relay's batches).
    """
    from celery import shared_task

    @shared_task(
        name=f"{consumer}.handle_event",
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=None,
    )
    def handle_event(self: Any, message: Any, failures: int = 0) -> str:
        # `failures` counts failed attempts only; waiting out a pause is not one.
        attempt = failures + 1
        batch = message if isinstance(message, list) else [message]
        try:
            outcome = process_batch(consumer, batch)
        except ConsumerPaused:
            raise self.retry(
                countdown=random.uniform(0.5, 1.5),
                kwargs={"failures": failures},
            ) from None
        except (OperationalError, InterfaceError) as exc:
            # The database went away (restart, failover, a terminated
            # backend) outside a handler: nothing was applied and the event
            # is not at fault. Retry on a fresh connection, uncounted: acking
            # here would leave the lane behind until some later event.
            _transient_database_error(consumer, exc)
            raise self.retry(countdown=retry_delay(1), kwargs={"failures": failures}) from exc
        for invalid, error in outcome.invalid:
            dead_letter(consumer, invalid, str(error), _format(error), attempt, None)
            logger.error("%s: invalid message dead-lettered: %s", consumer, error)
        retry: list[Any] = []
        transient = False
        for failure in outcome.failed:
            exc = failure.error
            if isinstance(exc.error, OperationalError | InterfaceError):
                # Raised while a handler ran, but not the event's fault either.
                _transient_database_error(consumer, exc.error)
                transient = True
                retry.extend(failure.messages)
                continue
            observe.handler_failed(consumer, exc)  # [observability]
            max_attempts = settings.EVENTING["MAX_ATTEMPTS"]
            if exc.permanent or attempt >= max_attempts:
                dead_letter(
                    consumer,
                    _message_naming(failure.messages, exc.event),
                    str(exc),
                    exc.traceback,
                    attempt,
                    exc.event,
                )
                logger.error(
                    "%s: event %s dead-lettered after %d attempts: %s",
                    consumer,
                    exc.event.event_id,
                    attempt,
                    exc,
                )
                continue
            observe.handler_retrying(consumer, exc)  # [observability]
            logger.warning(
                "%s: event %s failed (attempt %d/%d), retrying: %s",
                consumer,
                exc.event.event_id,
                attempt,
                max_attempts,
                exc,
            )
            retry.extend(failure.messages)
        if retry:
            # Only the failed lanes go round again; the rest are committed.
            countdown = retry_delay(1) if transient else retry_delay(attempt)
            raise self.retry(
                args=(retry if len(retry) > 1 else retry[0],),
                countdown=countdown,
                kwargs={"failures": failures if transient else attempt},
            )
        if outcome.failed:
            return "dead-lettered"
        return outcome.status

    return handle_event


def _format(error: BaseException) -> str:
    return "".join(tb.format_exception(error))


def _message_naming(messages: list[Any], event: StoredEvent) -> Any:
    """Of a lane's messages, the one naming `event`, else its newest."""
    for message in messages:
        if isinstance(message, dict) and message.get("id") == str(event.event_id):
            return message
    return max(messages, key=lambda m: int(m.get("aggregateversion", 0)))
