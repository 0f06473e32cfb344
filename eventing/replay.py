"""Rebuilding projections' read models from the event store.

Exactness: a projection's rows are a function of the events its consumer has
applied, i.e. of each lane's events up to the lane's checkpoint. Replay pauses
the consumer (so checkpoints hold still), clears the rows and reapplies the
projection's handlers to exactly those events, in global position order.
Events past a checkpoint are left to the live path, which catches them up
after the pause ends. Checkpoints are never moved by replay, so policies
(handlers that issue commands) are neither rerun nor skipped.

Safety while live: `paused()` sets the consumer's pause flag, then takes the
consumer's advisory lock exclusively once, which waits for every transaction
that started before the flag (they hold it shared) to finish. Messages that
arrive during the pause are retried by the consumer task later; none is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import orjson
from django.db import connection, transaction
from django.db.models import Q, QuerySet, TextField
from django.db.models.functions import Cast
from django.utils import timezone

from . import context
from .consumers import EventMeta, Projection, ReadModel, consumer_lock_key, prefetch_rows
from .consumers import registry as consumers
from .events import registry as event_registry
from .models import Checkpoint, ConsumerState, StoredEvent
from .rows import BatchedRows, Statement, take_dirty, unit_of_work

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]
Snapshot = dict[str, dict[tuple[Any, ...], dict[str, Any]]]


class ReplayError(RuntimeError):
    pass


@dataclasses.dataclass
class Difference:
    read_model: str
    key: tuple[Any, ...]
    live: dict[str, Any] | None
    rebuilt: dict[str, Any] | None

    def describe(self) -> str:
        row = f"{self.read_model} {'/'.join(str(part) for part in self.key)}"
        if self.live is None:
            return f"{row}: missing from the live read model"
        if self.rebuilt is None:
            return f"{row}: in the live read model, not derived from events"
        fields = sorted(k for k in self.live if self.live[k] != self.rebuilt.get(k))
        changes = ", ".join(f"{f}: {self.live[f]!r} -> {self.rebuilt.get(f)!r}" for f in fields)
        return f"{row}: {changes}"


@dataclasses.dataclass
class ReplayResult:
    projections: list[str]
    events_read: int = 0
    events_applied: int = 0
    rows_cleared: int = 0
    committed: bool = False
    differences: list[Difference] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def paused(consumer_names: Iterable[str], reason: str) -> Iterator[None]:
    names = sorted(set(consumer_names))
    now = timezone.now()
    for name in names:
        ConsumerState.objects.update_or_create(
            consumer=name, defaults={"paused": True, "paused_reason": reason, "paused_at": now}
        )
    with connection.cursor() as cursor:
        for name in names:
            # Live transactions hold this lock shared from before they read
            # the flag until they commit: getting it once means every one
            # that could have missed the flag is done.
            cursor.execute("SELECT pg_advisory_lock(%s)", [consumer_lock_key(name)])
            cursor.execute("SELECT pg_advisory_unlock(%s)", [consumer_lock_key(name)])
    try:
        yield
    finally:
        resume(names)


def resume(names: Iterable[str]) -> None:
    ConsumerState.objects.filter(consumer__in=list(names)).update(
        paused=False, paused_reason="", paused_at=None
    )


def _row_key(read_model: ReadModel, values: dict[str, Any]) -> tuple[Any, ...]:
    pk_name = read_model.model._meta.pk.attname
    return tuple(values[pk_name if f == "pk" else f] for f in read_model.natural_key)


def snapshot(projections: list[Projection], keys: set[str] | None = None) -> Snapshot:
    """Every row of the projections' read models, keyed by natural key, with
    the compared fields only."""
    result: Snapshot = {}
    for projection in projections:
        for read_model in projection.read_models:
            exclude = set(read_model.compare_exclude)
            qs = read_model.model.objects.all()
            if keys is not None and read_model.key_field:
                qs = qs.filter(**{f"{read_model.key_field}__in": keys})
            rows = {}
            for values in qs.values():
                key = _row_key(read_model, values)
                rows[key] = {k: v for k, v in values.items() if k not in exclude}
            result[read_model.label] = rows
    return result


def diff(live: Snapshot, rebuilt: Snapshot) -> list[Difference]:
    differences = []
    for label in sorted(set(live) | set(rebuilt)):
        before, after = live.get(label, {}), rebuilt.get(label, {})
        for key in sorted(set(before) | set(after), key=repr):
            if before.get(key) != after.get(key):
                differences.append(Difference(label, key, before.get(key), after.get(key)))
    return differences


def _clear(projection: Projection, keys: set[str] | None) -> int:
    cleared = 0
    for read_model in projection.read_models:
        qs = read_model.model.objects.all()
        if keys is not None:
            assert read_model.key_field
            qs = qs.filter(**{f"{read_model.key_field}__in": keys})
        # Read models are not event-sourced: deleting rows is their reset.
        # (No other table points at them, so Django issues one DELETE.)
        cleared += qs.delete()[0]
    return cleared


def _event_filter(
    *, aggregate_ids: set[str] | None, event_types: set[str] | None, from_position: int | None
) -> Q:
    q = Q()
    if aggregate_ids is not None:
        q &= Q(aggregate_id__in=aggregate_ids)
    if event_types is not None:
        q &= Q(event_type__in=event_types)
    if from_position is not None:
        q &= Q(position__gte=from_position)
    return q


def affected_aggregates(
    projections: list[Projection],
    *,
    aggregate_ids: set[str] | None,
    event_types: set[str] | None,
    from_position: int | None,
) -> set[str] | None:
    """The aggregate ids whose rows a filtered rebuild must redo (None: all)."""
    if aggregate_ids is None and event_types is None and from_position is None:
        return None
    if aggregate_ids is not None and event_types is None and from_position is None:
        return aggregate_ids
    types = {name for p in projections for name in _handled_types(p)}
    q = _event_filter(
        aggregate_ids=aggregate_ids, event_types=event_types, from_position=from_position
    )
    return set(
        StoredEvent.objects.filter(q, event_type__in=types)
        .values_list("aggregate_id", flat=True)
        .distinct()
    )


def _handled_types(projection: Projection) -> set[str]:
    spec = consumers.get(projection.consumer)
    return {
        name
        for name, specs in spec.handlers.items()
        if any(h.projection == projection.name for h in specs)
    }


def rebuild(
    projections: list[Projection],
    *,
    aggregate_ids: set[str] | None = None,
    commit: bool = True,
    compare: bool = False,
    batch_size: int = 2000,
    progress: Callable[[int], None] | None = None,
    total_hint: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Rebuild the projections (all their rows, or the rows of `aggregate_ids`).

    With `commit=False` the rebuild happens in a transaction that is rolled
    back: a scratch space no reader ever sees. With `compare=True` the live
    rows are snapshotted first and the differences reported.
    """
    result = ReplayResult(projections=[p.name for p in projections])
    consumer_names = {p.consumer for p in projections}
    # A projection whose rows depend on several streams cannot be rebuilt
    # for a few aggregates alone: rebuild it whole.
    scopes = {p.name: (aggregate_ids if p.partial_rebuild_possible else None) for p in projections}
    with paused(consumer_names, reason="replay_events"), transaction.atomic():
        live = (
            {
                label: rows
                for p in projections
                for label, rows in snapshot([p], scopes[p.name]).items()
            }
            if compare
            else {}
        )
        checkpoints = _load_checkpoints(consumer_names)
        for projection in projections:
            result.rows_cleared += _clear(projection, scopes[projection.name])
        handlers = _handlers_by_type(projections)
        q = Q(event_type__in=list(handlers))
        if all(scope is not None for scope in scopes.values()) and aggregate_ids is not None:
            q &= Q(aggregate_id__in=aggregate_ids)
        events = StoredEvent.objects.filter(q).order_by("position")
        if total_hint is not None:
            total_hint(events.count())
        batched = _batched_rows_by_type(handlers)
        with context.scope(replaying=True, in_handler=True, side_effects=True):
            cleared = _Cleared(_scopes_by_rows(projections, scopes))
            for applied, read in _apply_all(
                events, batch_size, handlers, batched, checkpoints, scopes, cleared
            ):
                result.events_applied += applied
                result.events_read += read
                if progress is not None and read:
                    progress(read)
        if compare:
            rebuilt = {
                label: rows
                for p in projections
                for label, rows in snapshot([p], scopes[p.name]).items()
            }
            result.differences = diff(live, rebuilt)
        if not commit:
            transaction.set_rollback(True)
        result.committed = commit
    return result


def _load_checkpoints(consumer_names: set[str]) -> dict[tuple[str, str, str], int]:
    return {
        (c, t, i): v
        for c, t, i, v in Checkpoint.objects.filter(consumer__in=consumer_names).values_list(
            "consumer", "aggregate_type", "aggregate_id", "version"
        )
    }


HandlerEntry = tuple[Projection, Any]


def _handlers_by_type(projections: list[Projection]) -> dict[str, list[HandlerEntry]]:
    wanted = {p.name: p for p in projections}
    by_type: dict[str, list[HandlerEntry]] = {}
    for projection in projections:
        spec = consumers.get(projection.consumer)
        for name, specs in spec.handlers.items():
            for handler in specs:
                if handler.projection in wanted and handler.projection == projection.name:
                    by_type.setdefault(name, []).append((projection, handler))
    return by_type


class EventRow(NamedTuple):
    """A stored event as replay reads it: its columns without a model instance
    (a million of those cost more than the rebuild itself). It has the
    attributes handlers' metadata is built from (`EventMeta.of`)."""

    position: int
    event_id: str  # its canonical text, as EventMeta holds it
    aggregate_type: str
    aggregate_id: str
    version: int
    event_type: str
    schema_version: int
    payload: Any
    source: str
    time: dt.datetime
    correlation_id: str
    causation_id: str
    traceparent: str
    actor: str
    chain_depth: int


def _batched_rows_by_type(handlers: dict[str, list[HandlerEntry]]) -> dict[str, list[BatchedRows]]:
    by_type: dict[str, list[BatchedRows]] = {}
    for event_type, entries in handlers.items():
        for projection, _ in entries:
            for rows in projection.batched_rows:
                if rows not in by_type.setdefault(event_type, []):
                    by_type[event_type].append(rows)
    return by_type


# A run of 19 digits may be an integer beyond 64 bits, which orjson would
# turn into a float where the live path (json.loads) keeps it exact. The
# check maps every ASCII digit to "0" and anything else to " " (one C-level
# pass over the bytes; a regex search cost as much as the parse itself) and
# looks for 19 zeros: JSON numbers are ASCII digits only, and a run inside a
# string merely takes the slow path.
_DIGITS_TO_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19


def _loads(text: str) -> Any:
    """A payload as the live path parses it (json.loads), at orjson's speed
    (a third of the time) whenever the two agree."""
    if _LONG_RUN in text.encode().translate(_DIGITS_TO_ZEROS):
        return json.loads(text)
    return orjson.loads(text)


def _read_chunks(events: QuerySet[StoredEvent], batch_size: int) -> Iterator[list[EventRow]]:
    """The events as `EventRow`s, `batch_size` at a time, through a server-side
    cursor. Raw rows, not `values_list()`: the ORM's per-value converters cost
    more than the database read. Aware datetimes come from the driver as they
    are; the event id arrives as text (what `EventMeta` holds: a UUID object
    built and formatted again cost ~5% of a rebuild), the payload as JSON text."""
    columns = [
        Cast("event_id", TextField()) if name == "event_id" else name for name in EventRow._fields
    ]
    sql, params = events.values_list(*columns).query.sql_with_params()
    payload = EventRow._fields.index("payload")
    with connection.chunked_cursor() as cursor:
        cursor.execute(sql, params)
        while rows := cursor.fetchmany(batch_size):
            if isinstance(rows[0][payload], str):
                yield [EventRow(*v[:payload], _loads(v[payload]), *v[payload + 1 :]) for v in rows]
            else:
                yield [EventRow._make(values) for values in rows]


class _Cleared:
    """The batched rows a rebuild knows are not in their table, without asking.

    A rebuild clears its scope's rows before it folds (all of them, or those
    of the aggregates rebuilt), so such a row exists only if a chunk of this
    rebuild wrote it; every write of a batched row goes through `take_dirty`,
    whose statements name the rows they write (`Statement.slots`). The
    chunk's prefetch then asks the database only for the rows that may be
    there: in a rebuild whose aggregates span one chunk each, none (the
    lookups cost ~5% of the fold and a round trip on the critical path).

    The rows written are kept as a bitmap of their hashed slots, 8 MiB
    whatever their number. A collision can only make a row look written,
    which costs the lookup the rebuild would have made anyway; a written row
    never looks unwritten."""

    _BITS = 1 << 26

    def __init__(self, scopes: dict[BatchedRows, set[str] | None]) -> None:
        self._scopes = scopes
        self._bits = bytearray(self._BITS >> 3)

    def wrote(self, slots: Iterable[tuple[str, str]]) -> None:
        bits, mask = self._bits, self._BITS - 1
        for slot in slots:
            h = hash(slot) & mask
            bits[h >> 3] |= 1 << (h & 7)

    def mark_absent(
        self,
        rows: dict[tuple[str, str], Any],
        batched: dict[str, list[BatchedRows]],
        chunk: list[EventRow],
    ) -> None:
        """Record as absent (None, as a prefetch that found nothing does) the
        chunk's rows that were cleared and not written since."""
        bits, mask = self._bits, self._BITS - 1
        labels = {
            read_model: read_model.label for per_type in batched.values() for read_model in per_type
        }
        for row in chunk:
            for read_model in batched.get(row.event_type, ()):
                scope = self._scopes[read_model]
                if scope is not None and row.aggregate_id not in scope:
                    continue
                slot = (labels[read_model], row.aggregate_id)
                if slot in rows:
                    continue
                h = hash(slot) & mask
                if not bits[h >> 3] & (1 << (h & 7)):
                    rows[slot] = None


def _scopes_by_rows(
    projections: list[Projection], scopes: dict[str, set[str] | None]
) -> dict[BatchedRows, set[str] | None]:
    """Each batched read model's cleared scope (None: every row). One shared
    by projections rebuilt with different scopes counts as cleared nowhere."""
    by_rows: dict[BatchedRows, set[str] | None] = {}
    for projection in projections:
        for read_model in projection.batched_rows:
            scope = scopes[projection.name]
            if read_model in by_rows and by_rows[read_model] != scope:
                scope = set()
            by_rows[read_model] = scope
    return by_rows


# Events folded between two young collections: garbage of ~20 chunks of the
# default size at most, one traversal of what is alive per 20,000 events.
_COLLECT_EVERY = 20_000


class _YoungCollections:
    """The cyclic garbage collector, paced by events instead of allocations.

    The fold allocates some thirty containers per event (rows, payload dicts,
    events, metadata, model instances, timeline entries) and frees nearly all
    of them by reference counting; but the collector's default pace (one
    young collection per 700 allocations, a full one every ~100 of those)
    traversed them again and again: 15-20% of a rebuild in the GC callbacks'
    own timing. While the fold runs, automatic collection is off and the
    young generations are collected once every `every` events, which bounds
    whatever cyclic garbage handlers make to that many events' worth. The
    collector's state is process-wide: it is restored when the fold ends,
    whether it ends well or not."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._since = 0
        self._was_enabled = False

    def __enter__(self) -> _YoungCollections:
        self._was_enabled = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._was_enabled:
            gc.enable()

    def folded(self, events: int) -> None:
        self._since += events
        if self._since >= self.every:
            self._since = 0
            gc.collect(1)


class _BackgroundWriter:
    """Runs a chunk's row writes on the rebuild's own connection from a second
    thread, so that PostgreSQL writes chunk N while Python folds chunk N+1 (the
    write is ~40 µs a row of server time). psycopg2 serializes the threads' use
    of the connection, and the statements run in the rebuild's transaction."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-writer")
        self._pending: Future[None] | None = None

    def submit(self, statements: list[Statement]) -> None:
        self.wait()
        if statements:
            connection.ensure_connection()
            self._pending = self._executor.submit(_execute, connection.connection, statements)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, *, quiet: bool = False) -> None:
        """Wait for the last write. `quiet` (another error is on its way up):
        log the write's own failure rather than hide that error behind it."""
        try:
            self.wait()
        except Exception:
            if not quiet:
                raise
            logger.warning("replay: the background write failed as well", exc_info=True)
        finally:
            self._executor.shutdown()


def _execute(raw_connection: Any, statements: list[Statement]) -> None:
    with raw_connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement.sql, statement.params)


def _apply_all(
    events: QuerySet[StoredEvent],
    batch_size: int,
    handlers: dict[str, list[HandlerEntry]],
    batched: dict[str, list[BatchedRows]],
    checkpoints: dict[tuple[str, str, str], int],
    scopes: dict[str, set[str] | None],
    cleared: _Cleared,
) -> Iterator[tuple[int, int]]:
    """Apply the events chunk by chunk; yields (applied, read) per chunk.

    The batched read models' rows of a chunk are read in one query and
    written in one (the consumers are paused: no locks needed), and the write
    of chunk N overlaps the fold of chunk N+1. What keeps that exact:
    - the rows chunk N wrote stay in memory while chunk N+1 is folded, so
      chunk N+1 never reads them back from the database while they are being
      written;
    - any other row was last written by chunk N-1 or earlier, whose write
      is finished before chunk N+1 reads anything.
    Handlers of unbatched read models write through the same connection; their
    statements simply wait for a running write. Rows the rebuild cleared and
    has not written since are not looked up (`_Cleared`).
    """
    read_models = {rows for per_type in batched.values() for rows in per_type}
    chunks = _read_chunks(events, batch_size)
    writer = _BackgroundWriter()
    try:
        with unit_of_work(lock=False) as uow, _YoungCollections(_COLLECT_EVERY) as collector:
            chunk = next(chunks, None)
            if chunk is not None:
                cleared.mark_absent(uow.rows, batched, chunk)
                prefetch_rows(batched, chunk)
            while chunk is not None:
                # From here to the wait, Python runs beside the previous
                # chunk's write (unbatched handlers' statements queue behind it).
                applied = sum(_apply(row, handlers, checkpoints, scopes) for row in chunk)
                statements = take_dirty(uow, read_models)
                written = {slot for statement in statements for slot in statement.slots}
                cleared.wrote(written)
                uow.rows = {slot: row for slot, row in uow.rows.items() if slot in written}
                # The previous chunk's rows are in the database now; read the
                # next chunk and its rows while the connection is free.
                writer.wait()
                read = len(chunk)
                chunk = next(chunks, None)
                if chunk is not None:
                    cleared.mark_absent(uow.rows, batched, chunk)
                    prefetch_rows(batched, chunk)
                writer.submit(statements)
                collector.folded(read)
                yield applied, read
    except BaseException:
        chunks.close()
        writer.close(quiet=True)
        raise
    chunks.close()
    writer.close()


def _apply(
    row: EventRow,
    handlers: dict[str, list[HandlerEntry]],
    checkpoints: dict[tuple[str, str, str], int],
    scopes: dict[str, set[str] | None],
) -> int:
    applied = 0
    event = None
    for projection, handler in handlers.get(row.event_type, []):
        scope = scopes[projection.name]
        if scope is not None and row.aggregate_id not in scope:
            continue
        lane = (projection.consumer, row.aggregate_type, row.aggregate_id)
        if row.version > checkpoints.get(lane, 0):
            continue  # not applied live yet: the live path will apply it
        if event is None:
            try:
                event = event_registry.decode(row.event_type, row.schema_version, row.payload)
            except Exception as exc:
                raise ReplayError(f"cannot decode event #{row.position}: {exc}") from exc
        meta = EventMeta.of(row, consumer=projection.consumer, replaying=True)
        try:
            handler.func(event, meta)
        except Exception as exc:
            raise ReplayError(
                f"{handler.qualname} failed on event #{row.position} "
                f"({row.event_type} {row.aggregate_type}/{row.aggregate_id} v{row.version}): {exc}"
            ) from exc
        applied += 1
    return applied
