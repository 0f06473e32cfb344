"""The append-only event store and the outbox writes that go with it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from . import context, metrics, observe, tracing
from .events import DomainEvent
from .models import StoredEvent

logger = logging.getLogger(__name__)


class ConcurrencyError(RuntimeError):
    """The stream moved past the version the writer read: reload and retry."""


class ChainDepthExceeded(RuntimeError):
    """A handler emitted an event deeper than the configured chain limit."""


@observe.observed_append  # [observability] a span per append; events counted at commit
def append(
    *,
    aggregate_type: str,
    aggregate_id: str,
    expected_version: int,
    events: Sequence[DomainEvent],
    along_with: Callable[[], object] | None = None,
    table: str = "",
    key: object = None,
) -> list[StoredEvent]:
    """Append `events` to a stream and queue them in the outbox.

    Must run inside the caller's transaction, the one that writes the
    aggregate's row: the events exist iff that transaction commits.

    `along_with` is the aggregate's own write (its `save()`), run here before
    the append. When that write is a plain INSERT or UPDATE of `table`'s row
    whose primary key is `key`, the append goes to the server in the same
    round trip (see `_AppendAlongside`); otherwise it follows as a statement
    of its own.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("store.append() must run inside transaction.atomic()")
    ctx = context.current()
    rows = _new_rows(aggregate_type, aggregate_id, expected_version, events, ctx, timezone.now())
    # Outside a consumer's handler the append joins the relay's wake-up
    # barrier; a handler's batch transaction can last long enough to hold up
    # a relay run's start, so it asks for a wake-up after commit.
    barrier = not ctx.in_handler
    sql, params = _append_statement(rows, barrier=barrier)
    with _stale_stream_refused(
        f"{aggregate_type}/{aggregate_id} is past version {expected_version}: "
        "another writer committed first; reload the aggregate and retry"
    ):
        returned = None
        if along_with is not None:
            alongside = _AppendAlongside(
                table,
                key,
                sql,
                params,
                after_update=functools.partial(_append_after_update, rows, barrier=barrier),
            )
            with connection.execute_wrapper(alongside):
                along_with()
            returned = alongside.returned
        if returned is None:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                returned = cursor.fetchall()
    if not _took_positions(rows, returned):
        schedule_relay_wake()
    return rows


@contextlib.contextmanager
def _stale_stream_refused(message: str) -> Iterator[None]:
    """A stream's unique (aggregate, version) key refusing an append means
    another writer committed first: ConcurrencyError(message)."""
    try:
        yield
    except IntegrityError as exc:
        if "event_stream_version" in str(exc):
            raise ConcurrencyError(message) from exc
        raise


def check_chain_depth(ctx: context.EventContext) -> None:
    """Raise ChainDepthExceeded if events recording `ctx` would be too deep
    (what every append checks; for a caller that must know before it acts)."""
    max_depth = settings.EVENTING["MAX_CHAIN_DEPTH"]
    if ctx.chain_depth > max_depth:
        raise ChainDepthExceeded(
            f"event chain depth {ctx.chain_depth} exceeds EVENTING MAX_CHAIN_DEPTH={max_depth}: "
            f"a handler loop is emitting events without end (correlation {ctx.correlation_id})"
        )


def _new_rows(
    aggregate_type: str,
    aggregate_id: str,
    expected_version: int,
    events: Sequence[DomainEvent],
    ctx: context.EventContext,
    now: Any,
) -> list[StoredEvent]:
    """The stored events of one stream's append, recording `ctx`."""
    check_chain_depth(ctx)
    correlation_id = ctx.correlation_id or context.new_correlation_id()
    return [
        StoredEvent(
            event_id=uuid.uuid4(),
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            version=expected_version + offset,
            event_type=event.name,
            schema_version=event.version,
            payload=event.to_payload(),
            source=settings.EVENTING["SOURCE"],
            time=now,
            correlation_id=correlation_id,
            causation_id=ctx.causation_id or "",
            traceparent=ctx.traceparent,
            actor=ctx.actor,
            chain_depth=ctx.chain_depth,
        )
        for offset, event in enumerate(events, start=1)
    ]


def _took_positions(rows: list[StoredEvent], returned: list[tuple]) -> bool:
    """Give the rows the positions the append returned; returns whether the
    relay is sure to claim them without a wake-up from this transaction."""
    positions = {str(event_id): position for position, event_id, _ in returned}
    for row in rows:
        row.position = positions[str(row.event_id)]
        row._state.adding = False
        row._state.db = connection.alias
    return bool(returned[0][2])


@dataclasses.dataclass(frozen=True)
class StreamAppend:
    """One stream's part of `append_streams`: its events, appended after
    `expected_version`, recording `context` (correlation, causation, actor,
    chain depth) as `append` records the current one."""

    aggregate_type: str
    aggregate_id: str
    expected_version: int
    events: Sequence[DomainEvent]
    context: context.EventContext


def append_streams(appends: Sequence[StreamAppend]) -> list[StoredEvent]:
    """Append to several streams in one statement (`append` sends one per
    stream): for a step that writes many aggregates' events at once, such as
    a batch of notifications each adding to its order's stream. Same rules
    as `append`: inside the caller's transaction, ConcurrencyError when a
    stream moved past its expected version (the whole call fails then).

    With tracing on, each stream is appended on its own, in its own span."""
    if not connection.in_atomic_block:
        raise RuntimeError("store.append_streams() must run inside transaction.atomic()")
    if not appends:
        return []
    if tracing.ACTIVE:
        stored = []
        for part in appends:
            with context.use(part.context):
                stored += append(
                    aggregate_type=part.aggregate_type,
                    aggregate_id=part.aggregate_id,
                    expected_version=part.expected_version,
                    events=part.events,
                )
        return stored
    now = timezone.now()
    rows = [
        row
        for part in appends
        for row in _new_rows(
            part.aggregate_type,
            part.aggregate_id,
            part.expected_version,
            part.events,
            part.context,
            now,
        )
    ]
    barrier = not context.current().in_handler
    sql, params = _append_statement(rows, barrier=barrier)
    with (
        _stale_stream_refused(
            f"one of {len(appends)} streams moved past its expected version: "
            "another writer committed first; reload and retry"
        ),
        connection.cursor() as cursor,
    ):
        cursor.execute(sql, params)
        returned = cursor.fetchall()
    if not _took_positions(rows, returned):
        schedule_relay_wake()
    if metrics.enabled():
        types = [row.event_type for row in rows]
        transaction.on_commit(lambda: metrics.count_appended(types), robust=True)
    return rows


class _AppendAlongside:
    """A Django execute wrapper: the aggregate's own row write goes to the
    server with the append, in one query string, so saving an aggregate with
    events costs no round trip for them.

    Two writes qualify, and only the first of them:
    - a plain INSERT into `table` without RETURNING: the append follows it as
      a second statement. Django reads nothing back from the cursor, and
      psycopg2 keeps the last statement's rows, the append's, read here.
    - an UPDATE of `table` without RETURNING: it becomes the first CTE of
      the append (`after_update`), whose events are written only if it
      changed a row. The cursor's row count, which Django reads to see
      whether the UPDATE found the row, is then the number of events
      appended: none when it did not, and Django goes on as it would (an
      INSERT, or its error), the append riding on that INSERT or following.
    Either must carry the aggregate's key among its values: another row of
    the table written meanwhile (by a signal, say) does not take the events.
    Anything else passes through untouched and the append runs on its own.
    Either statement failing fails the query string, so the row and its
    events still go in together or not at all."""

    def __init__(
        self,
        table: str,
        key: object,
        sql: str,
        params: Sequence[object],
        *,
        after_update: Callable[[], _AfterUpdate] | None = None,
    ) -> None:
        quoted = connection.ops.quote_name(table) if table else ""
        self.insert_prefix = f"INSERT INTO {quoted} " if table else None
        # A prefix to recognise Django's statement by, never executed itself.
        self.update_prefix = f"UPDATE {quoted} SET " if table else None  # noqa: S608
        self.key = key
        self.sql = sql
        self.params = params
        self.after_update = after_update
        self.returned: list[tuple] | None = None

    def __call__(
        self, execute: Callable, sql: str, params: Any, many: bool, context: dict[str, Any]
    ) -> object:
        if (
            self.returned is not None
            or self.insert_prefix is None
            or many
            or " RETURNING " in sql
            or self.key not in (params or ())
        ):
            return execute(sql, params, many, context)
        if sql.startswith(self.insert_prefix):
            result = execute(f"{sql};\n{self.sql}", (*(params or ()), *self.params), many, context)
            self.returned = context["cursor"].fetchall()
            return result
        if self.after_update is not None and sql.startswith(str(self.update_prefix)):
            update = self.after_update()  # built only now: most writes are INSERTs
            result = execute(
                f"{update.head}{sql}{update.tail}",
                (*update.head_params, *(params or ()), *update.tail_params),
                many,
                context,
            )
            # No rows: the UPDATE found no row and nothing was appended.
            self.returned = context["cursor"].fetchall() or None
            return result
        return execute(sql, params, many, context)


# The relay's wake-up barrier (see `eventing.relay`): a writer that finds the
# wake-up flag already set sends no wake-up, which is safe only if the relay
# run that will clear the flag claims after this writer's commit. So the
# writer holds this advisory lock shared from before it reads the flag until
# its transaction ends, and the relay takes it exclusively to clear the flag
# (and claims in that same transaction): the clear waits for every writer
# that read the flag set. A writer only *tries* the lock, so it never waits
# on the relay: while the relay holds or awaits the lock, the try fails and
# the writer asks for a wake-up after its commit, as a handler's append does.
WAKE_BARRIER_KEY = (0x52454C41 << 32) | 0x57414B45  # "RELA" "WAKE"


# The events and their outbox rows in one statement (one round trip on the
# write path, whatever the number of events). A VALUES list, one row of
# placeholders per event: PostgreSQL plans and runs it in about half the time
# of the same insert from `unnest()` over fourteen arrays (0.3 vs 0.75 ms for
# one event here), and most appends carry one or two events. Outbox ids
# follow the positions: the relay publishes in outbox id order. An outbox
# row's times are the database's clock, the one the relay's claim compares
# `available_at` with: an application clock running ahead would hold rows
# back by as much.
_APPEND_SQL = """{barrier}
WITH {updated}appended AS (
    INSERT INTO eventing_storedevent (
        event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload,
        source, time, correlation_id, causation_id, traceparent, actor, chain_depth)
    {rows}
    RETURNING position, event_id
), queued AS (
    INSERT INTO eventing_outboxmessage (
        event_id, consumer, created_at, available_at, attempts, last_error)
    SELECT position, '', now(), now(), 0, '' FROM appended ORDER BY position
)
SELECT position, event_id, {relay_will_look} FROM appended
"""
_APPEND_ROW = "(" + ", ".join(["%s"] * 14) + ")"
# The barrier's try goes in a statement of its own, before the one that
# reads the flag: in READ COMMITTED each statement takes its snapshot as it
# starts, so the flag is read after the lock is held. Only the last
# statement's rows come back, so the try's outcome is passed on in a
# transaction-local setting.
_TRY_BARRIER_SQL = (
    "SELECT set_config('eventing.wake_barrier', pg_try_advisory_xact_lock_shared(%s)::text, true);"
)
_RELAY_WILL_LOOK_SQL = (
    "current_setting('eventing.wake_barrier')::boolean "
    "AND coalesce((SELECT requested FROM eventing_relaywake WHERE id = 1), false)"
)


@functools.lru_cache(maxsize=32)
def _append_sql(n_events: int, barrier: bool) -> str:
    return _APPEND_SQL.format(
        barrier=_TRY_BARRIER_SQL if barrier else "",
        updated="",
        rows="VALUES " + ", ".join([_APPEND_ROW] * n_events),
        relay_will_look=_RELAY_WILL_LOOK_SQL if barrier else "false",
    )


# The append after an UPDATE of the aggregate's row, which becomes its first
# CTE: the events are inserted only if the UPDATE changed a row. Selected
# from a VALUES list, whose columns take their types from the values, not
# from the table: the payload's JSON text needs its cast.
_UPDATE_MARK = "\x00update\x00"
_APPEND_ROW_FROM_SELECT = "(" + ", ".join(["%s"] * 6 + ["%s::jsonb"] + ["%s"] * 7) + ")"


@dataclasses.dataclass(frozen=True)
class _AfterUpdate:
    """The append as `head` + <the UPDATE> + `tail`, with its parameters
    around the UPDATE's own."""

    head: str
    tail: str
    head_params: tuple[object, ...]
    tail_params: tuple[object, ...]


@functools.lru_cache(maxsize=32)
def _append_after_update_sql(n_events: int, barrier: bool) -> tuple[str, str]:
    sql = _APPEND_SQL.format(
        barrier=_TRY_BARRIER_SQL if barrier else "",
        updated=f"updated AS ({_UPDATE_MARK} RETURNING 1), ",
        rows=(  # constant text: placeholders only
            "SELECT * FROM (VALUES "  # noqa: S608
            + ", ".join([_APPEND_ROW_FROM_SELECT] * n_events)
            + ") AS v WHERE EXISTS (SELECT 1 FROM updated)"
        ),
        relay_will_look=_RELAY_WILL_LOOK_SQL if barrier else "false",
    )
    head, tail = sql.split(_UPDATE_MARK)
    return head, tail


def _append_after_update(rows: list[StoredEvent], *, barrier: bool) -> _AfterUpdate:
    head, tail = _append_after_update_sql(len(rows), barrier)
    params = _event_params(rows)
    return _AfterUpdate(head, tail, (WAKE_BARRIER_KEY,) if barrier else (), tuple(params))


# Server-side prepared appends (and the relay's claim, `prepared()`). Parsing
# and planning the append's statement
# took about as long as running it (~0.06 ms each), on every write, and
# psycopg2 does not prepare statements itself. Each connection prepares an
# append of n events (n up to _MAX_PREPARED_EVENTS; larger ones are rare and
# run unprepared) once, in a round trip of its own, then sends `EXECUTE`.
# A prepared statement belongs to the server session and survives rollbacks;
# a new connection (a new psycopg2 object) prepares again. A pooler that
# shares sessions between clients (PgBouncer in transaction mode) breaks that
# bookkeeping: turn EVENTING["PREPARED_APPEND"] off behind one.
_MAX_PREPARED_EVENTS = 16
_prepared: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=64)
def _prepared_forms(name: str, statement: str) -> tuple[str, str]:
    """(PREPARE, EXECUTE) of `statement`, whose parameters are `%s`."""
    pieces = statement.split("%s")
    numbered = pieces[0] + "".join(f"${i}{piece}" for i, piece in enumerate(pieces[1:], 1))
    execute = f"EXECUTE {name} ({', '.join(['%s'] * (len(pieces) - 1))})"
    return f"PREPARE {name} AS {numbered}", execute


def prepared(name: str, statement: str) -> str | None:
    """The EXECUTE of `statement` (one statement, parameters `%s`) prepared as
    `name` on this connection, preparing it first if need be; None when
    prepared statements are off (EVENTING["PREPARED_APPEND"]): run it as it is."""
    if not settings.EVENTING["PREPARED_APPEND"]:
        return None
    prepare, execute = _prepared_forms(name, statement)
    connection.ensure_connection()
    names = _prepared.setdefault(connection.connection, set())
    if name not in names:
        with connection.cursor() as cursor:
            cursor.execute(prepare)
        names.add(name)
    return execute


def _prepared_sql(n_events: int, barrier: bool) -> str | None:
    """The EXECUTE of a prepared n-event append on this connection (preparing
    it first if need be), or None to run the statement unprepared."""
    if n_events > _MAX_PREPARED_EVENTS:
        return None
    execute = prepared(*_prepared_append(n_events, barrier))
    if execute is None:
        return None
    return (_TRY_BARRIER_SQL if barrier else "") + execute


@functools.lru_cache(maxsize=64)
def _prepared_append(n_events: int, barrier: bool) -> tuple[str, str]:
    """(name, statement) of the prepared n-event append. Cached: the same
    statement object each time keeps its hash, and `prepared()`'s cache
    looks it up by that text on every write."""
    statement = _append_sql(n_events, barrier)
    if barrier:
        # The barrier's try stays a statement of its own before the EXECUTE.
        statement = statement.removeprefix(_TRY_BARRIER_SQL)
    return f"eventing_append_{n_events}{'_barrier' if barrier else ''}", statement


def _append_statement(rows: list[StoredEvent], *, barrier: bool) -> tuple[str, list[object]]:
    """The append's query string and parameters. Its rows are (position,
    event id, whether the relay is sure to claim them without a wake-up from
    this transaction: the flag was set and this transaction holds the
    barrier)."""
    # psycopg2 interpolates the values into the statement's text on the
    # client, so no limit on the number of parameters applies.
    params: list[object] = [WAKE_BARRIER_KEY] if barrier else []
    params += _event_params(rows)
    sql = _prepared_sql(len(rows), barrier) or _append_sql(len(rows), barrier)
    return sql, params


def _event_params(rows: list[StoredEvent]) -> list[object]:
    """The values of the rows, in the order of the INSERT's columns."""
    params: list[object] = []
    for r in rows:
        params += (
            r.event_id,
            r.aggregate_type,
            r.aggregate_id,
            r.version,
            r.event_type,
            r.schema_version,
            json.dumps(r.payload),
            r.source,
            r.time,
            r.correlation_id,
            r.causation_id,
            r.traceparent,
            r.actor,
            r.chain_depth,
        )
    return params


def load_stream(
    aggregate_type: str, aggregate_id: str, after_version: int = 0, up_to: int | None = None
) -> list[StoredEvent]:
    qs = StoredEvent.objects.filter(
        aggregate_type=aggregate_type, aggregate_id=aggregate_id, version__gt=after_version
    )
    if up_to is not None:
        qs = qs.filter(version__lte=up_to)
    return list(qs.order_by("version"))


def schedule_relay_wake() -> None:
    """Wake the relay once the current transaction commits.

    A hint only: losing it costs latency (the beat tick catches up), never data.
    One callback per transaction, however many events it appended.
    """
    from .relay import request_wake

    pending = getattr(connection, "run_on_commit", [])
    if any(entry[1] is request_wake for entry in pending):
        return
    transaction.on_commit(request_wake)
