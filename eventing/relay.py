"""The relay: outbox rows -> RabbitMQ, with batched publisher confirms.

Invariants:
- A batch is one transaction: its claim deletes the rows it takes (FOR UPDATE
  SKIP LOCKED, then DELETE ... RETURNING), the batch is published with
  confirms, rows the broker did not confirm are put back (same id, attempts
  + 1, a backoff, the error), and only then does it commit. So a row leaves
  the outbox only once the broker confirmed every message made from it; a
  relay that dies before its commit (its connection closes) rolls back, and
  its rows are claimable again at once. Consumers are idempotent: a batch
  published and then rolled back costs duplicates, never a loss.
- The transaction is open while the broker confirms (at most the publisher's
  confirm timeout, min(10 s, RELAY_LEASE_SECONDS / 2); the broker connection
  is made before it opens). A relay that stops answering in it (a hung
  process, a lost network) is ended by PostgreSQL after RELAY_LEASE_SECONDS
  idle (`idle_in_transaction_session_timeout`), which gives the rows back.
- A batch that fails as a whole (an error, not a refused message) rolls
  back; its rows get the attempt and the error in a transaction of their own,
  best effort, and the run sends a follow-up run. A relay process killed
  mid-batch records nothing: its rows are claimable at once, attempts
  unchanged.
- Several relays may run at once: SKIP LOCKED keeps them on disjoint rows. A
  row another relay leased (`claimed_until`, the claim of relays before this
  design) is skipped until its lease ends.
- Why not a lease per row with no transaction open: the lease was an UPDATE of
  every claimed row and the settle a DELETE of it, two writes a row; a claim
  that deletes is one. Per row that was ~19 µs of PostgreSQL time against ~13.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import select
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg2
from django.conf import settings
from django.db import DatabaseError, OperationalError, connection, transaction
from psycopg2.errorcodes import LOCK_NOT_AVAILABLE

from . import observe, store
from .consumers import registry as consumer_registry
from .events import registry as event_registry
from .publisher import ConfirmingPublisher, OutgoingMessage, PublishError

logger = logging.getLogger(__name__)

_publisher: ConfirmingPublisher | None = None


def new_publisher(
    broker_url: str | None = None, confirm_timeout: float | None = None
) -> ConfirmingPublisher:
    """A publisher on the platform's queues. Not thread-safe: one per thread."""
    from config.celery import app

    if confirm_timeout is None:
        # Confirms must arrive well within the lease: the batch's transaction
        # sits idle while they come, and PostgreSQL ends it after the lease.
        confirm_timeout = min(10.0, settings.EVENTING["RELAY_LEASE_SECONDS"] / 2)
    return ConfirmingPublisher(
        broker_url or settings.CELERY_BROKER_URL,
        list(app.conf.task_queues or []),
        confirm_timeout=confirm_timeout,
    )


def get_publisher() -> ConfirmingPublisher:
    global _publisher
    if _publisher is None:
        _publisher = new_publisher()
    return _publisher


@dataclasses.dataclass(slots=True)
class ClaimedRow:
    outbox_id: int
    consumer: str
    attempts: int
    # The event as sent: `StoredEvent.envelope()` built from the claim's
    # columns, the payload as an `orjson.Fragment` of the stored JSON text.
    # Routing, labels and traces read its "type", "id", "aggregatetype",
    # "aggregateid", "aggregateversion" and "traceparent".
    envelope: dict[str, Any]
    # The row's own columns, to put it back if it is not published. The
    # timestamp is PostgreSQL's text for it, which casts back to the same
    # value: parsing it into a datetime cost 1.5 µs a row, and it is only
    # ever handed back to the database.
    created_at: str
    event_position: int


@dataclasses.dataclass
class RelayReport:
    published_rows: int = 0
    messages: int = 0  # deliveries: one per (row, consumer)
    broker_messages: int = 0  # confirmed AMQP messages (a batch carries many rows)
    failed_rows: int = 0
    batches: int = 0
    claimed_rows: int = 0  # of the last claim
    # Outbox rows whose stored event is gone (only a store emptied by hand
    # leaves such rows): they cannot be published, and were dropped.
    dropped_rows: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    # The publish failed as a whole (the broker unreachable, no confirm in time).
    publish_failed: bool = False
    # The run could not clear the wake-up flag (a writer held the barrier):
    # commits ask for nothing until a run clears it. The run sent a follow-up
    # run unless it was one (see `relay()`).
    flag_left_set: bool = False


# What `claimed_rows` reads after the outbox columns, for a stored event `e`.
# The payload comes as the store's JSON text and goes out as it is, never
# parsed and serialized again.
EVENT_COLUMNS_SQL = (
    "e.event_id::text, e.event_type, e.aggregate_type, e.aggregate_id, e.version, "
    "e.traceparent, e.source, e.time, e.schema_version, e.position, e.correlation_id, "
    "e.causation_id, e.actor, e.chain_depth, e.payload::text"
)


# The outbox rows are reached by primary key from an array (`= ANY(ARRAY(...))`)
# and each one's event by a lateral lookup on the store's primary key: a plain
# join let the planner hash or merge-join whole tables, a cost that grows with
# the backlog and the store. The lateral LEFT JOIN keeps a row whose event is
# gone (its columns NULL), so that it is reported, not dropped unseen.
# A row is due by the clock as this statement starts (an InitPlan, read once),
# not by now(): that is when the batch's query string reached the server, and
# a writer's row stamped after it (a writer the clear waited for, or one that
# committed meanwhile) must be claimed here.
# Constant text only (no values): S608 does not apply.
_CLAIM_SQL = f"""
WITH claimable AS (
    SELECT o.id FROM eventing_outboxmessage o
    WHERE o.available_at <= (SELECT clock_timestamp())
      AND (o.claimed_until IS NULL OR o.claimed_until < now())
    ORDER BY o.id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    DELETE FROM eventing_outboxmessage o
    WHERE o.id = ANY(ARRAY(SELECT id FROM claimable))
    RETURNING o.id, o.consumer, o.attempts, o.created_at, o.event_id
)
SELECT c.id, c.consumer, c.attempts, c.created_at::text, c.event_id, {EVENT_COLUMNS_SQL}
FROM claimed c LEFT JOIN LATERAL (
    SELECT * FROM eventing_storedevent s WHERE s.position = c.event_id
) e ON true
"""  # noqa: S608


# The relay's own commits need not wait for the WAL to reach the disk: if the
# database crashes and loses one, the batch's rows are back in the outbox and
# are published again - a duplicate the consumers skip - and never lost,
# because the commit comes only after the confirms. (A lost clear of the
# wake-up flag delays wake-ups until the next beat tick.)
_NO_FLUSH_WAIT = "SET LOCAL synchronous_commit = off;"
# A batch's transaction stays open while the broker confirms; if the relay
# stops answering in it, PostgreSQL ends the session after this long idle
# (milliseconds), and the claimed rows are back.
_IDLE_LIMIT = "SET LOCAL idle_in_transaction_session_timeout = %s;"
# A relay run clears the wake-up flag through the writers' barrier
# (`store.WAKE_BARRIER_KEY`): if the flag is set, it takes the barrier
# exclusively, which waits for each writer that read the flag set (and so
# sent no wake-up) to end its transaction. If the flag is not set, no writer
# counts on this run and nothing waits; should a wake-up request set it
# between the two statements, it is cleared only if the barrier is free at
# once, and otherwise left for the run that request started. Writers only
# try the barrier, so none waits on it; the timeout bounds the relay's wait
# on a writer's transaction that stays open long after its append.
#
# The clear commits on its own, before the claim that goes with it: that
# claim's snapshot then follows every commit whose wake-up request could
# have seen the flag still set. A request (`request_wake`) reads the
# committed flag and does not wait for a clear in flight; had the clear
# committed with the claim, a commit landing after the claim's snapshot but
# before that commit would have found the flag set, asked for nothing, and
# not been claimed either - left for beat's tick.
WAKE_BARRIER_TIMEOUT_MS = 50
# Parameters: the lock timeout, the barrier's key twice (`_clear_wake_params`).
_CLEAR_WAKE_SQL = (
    "SET LOCAL synchronous_commit = off;"  # _NO_FLUSH_WAIT
    "SELECT set_config('lock_timeout', %s, true), pg_advisory_xact_lock(%s) "
    "FROM eventing_relaywake WHERE id = 1 AND requested;"
    "SET LOCAL lock_timeout = DEFAULT;"
    "UPDATE eventing_relaywake SET requested = false "
    "WHERE id = 1 AND requested AND pg_try_advisory_xact_lock(%s);"
)
# Outside a run (its wake-up could not be sent, its claim failed): clear the
# flag only if no writer holds the barrier, without waiting; otherwise it
# stays set and beat's tick clears it.
_CLEAR_WAKE_IF_FREE_SQL = (
    "UPDATE eventing_relaywake SET requested = false "
    "WHERE id = 1 AND requested AND pg_try_advisory_xact_lock(%s);"
)


def _clear_wake_params() -> list[Any]:
    return [f"{WAKE_BARRIER_TIMEOUT_MS}ms", store.WAKE_BARRIER_KEY, store.WAKE_BARRIER_KEY]


class WakeBarrierBusy(Exception):
    """The wake-up flag was not cleared: a writer's transaction held the
    barrier past WAKE_BARRIER_TIMEOUT_MS."""


def _raise_if_barrier_busy(exc: OperationalError) -> None:
    if getattr(exc.__cause__, "pgcode", None) == LOCK_NOT_AVAILABLE:
        raise WakeBarrierBusy(str(exc)) from exc


def _one_transaction(cursor: Any, sql: str, params: list[Any]) -> None:
    """Run `sql` (several statements) as one transaction in one round trip.

    Outside `atomic()` the statements of one query string form one implicit
    transaction on the server, where `atomic()` would add a BEGIN and a
    COMMIT round trip (each ~0.3 ms here, and the relay's claims and settles
    are on every event's path); a failed statement rolls back all of them.
    Inside `atomic()` (a test's transaction) they run in a savepoint, so a
    failure leaves the caller's transaction usable, as it would be without."""
    if connection.in_atomic_block:
        with transaction.atomic():
            cursor.execute(sql, params)
    else:
        cursor.execute(sql, params)


class NotInTransaction(RuntimeError):
    """`claim_batch` deletes the rows it claims: outside a transaction they
    would be gone before anything was published."""


def claim_batch(limit: int, lease_seconds: float) -> tuple[list[ClaimedRow], int]:
    """Claim up to `limit` rows in the caller's transaction (taking them out of
    the outbox until it commits); returns them, with the number of rows
    dropped because their stored event is gone. `lease_seconds` bounds how
    long the transaction may then sit idle."""
    if not connection.in_atomic_block:
        raise NotInTransaction("claim_batch must run inside transaction.atomic()")
    sql = _NO_FLUSH_WAIT + _IDLE_LIMIT + _claim_sql()
    with connection.cursor() as cursor:
        cursor.execute(sql, [int(lease_seconds * 1000), limit])
        return _claimed_or_dropped(cursor.fetchall())


def _claim_sql() -> str:
    """The claim, as a prepared statement's EXECUTE where they are on: its
    planning took ~0.4 ms, a run's whole claim at a low rate."""
    return store.prepared("eventing_relay_claim", _CLAIM_SQL) or _CLAIM_SQL


def _claimed_or_dropped(rows: list[tuple[Any, ...]]) -> tuple[list[ClaimedRow], int]:
    found = [row for row in rows if row[5] is not None]
    dropped = len(rows) - len(found)
    if dropped:
        missing = sorted(row[0] for row in rows if row[5] is None)
        logger.error(
            "relay: dropped %d outbox rows whose stored event is gone (outbox ids %s)",
            dropped,
            missing[:20],
        )
    claimed = claimed_rows(found)
    claimed.sort(key=lambda r: r.outbox_id)
    return claimed, dropped


def claimed_rows(rows: list[tuple[Any, ...]]) -> list[ClaimedRow]:
    """ClaimedRows from (outbox id, consumer, attempts, created_at, event
    position) followed by the EVENT_COLUMNS_SQL columns.

    The envelope is `StoredEvent.envelope()` built from the columns, with the
    payload's text spliced in as it is stored. It stays a dict until a
    message's body is written: one `orjson.dumps` of a message's envelopes
    took a third of the time of one per envelope, whose ~900-byte results
    then had to be kept and copied into the body."""
    claimed = []
    for row in rows:
        outbox_id, consumer, attempts, created_at, event_position, event_id = row[:6]
        event_type, aggregate_type, aggregate_id, version, traceparent, source = row[6:12]
        time_, schema_version, position, correlation_id, causation_id, actor = row[12:18]
        chain_depth, payload = row[18:]
        envelope = {
            "specversion": "1.0",
            "id": event_id,
            "source": source,
            "type": event_type,
            "subject": f"{aggregate_type}/{aggregate_id}",
            "time": time_,
            "datacontenttype": "application/json",
            "dataschemaversion": schema_version,
            "aggregatetype": aggregate_type,
            "aggregateid": aggregate_id,
            "aggregateversion": version,
            "position": position,
            "correlationid": correlation_id,
            "causationid": causation_id,
            "traceparent": traceparent,
            "actor": actor,
            "chaindepth": chain_depth,
            "data": orjson.Fragment(payload),
        }
        claimed.append(
            ClaimedRow(outbox_id, consumer, attempts, envelope, created_at, event_position)
        )
    return claimed


def task_label(envelopes: list[dict[str, Any]]) -> str:
    """What Flower shows as the task's arguments: "<type> <aggregate> v<n>"
    for the first events of the batch."""
    labels = [
        f"{e['type']} {e['aggregatetype']}/{e['aggregateid']} v{e['aggregateversion']}"
        for e in envelopes[:3]
    ]
    more = len(envelopes) - len(labels)
    return "; ".join(labels) + (f"; and {more} more" if more > 0 else "")


def build_task_message(
    consumer: str, rows: list[ClaimedRow], body_args: bytes | None = None
) -> OutgoingMessage:
    """A Celery protocol-2 task message for `<consumer>.handle_event` carrying
    the rows' envelopes, which the consumer applies in one transaction. The
    body is JSON, serialized here; `body_args` is `task_args_json(rows)` when
    the caller has it already (the same rows going to another consumer)."""
    from config.celery import app

    spec = consumer_registry.get(consumer)
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(
        task_id,
        spec.task_name,
        args=(),
        kwargs={},
        argsrepr=task_label([row.envelope for row in rows]),
        kwargsrepr="{}",
    )
    # Celery's protocol-2 body is [args, kwargs, embed]; args is ([envelopes],).
    _, kwargs, embed = message.body
    if body_args is None:
        body_args = task_args_json(rows)
    body = b"[%s,%s,%s]" % (body_args, orjson.dumps(kwargs), orjson.dumps(embed))
    return OutgoingMessage(
        keys=tuple(row.outbox_id for row in rows),
        routing_key=spec.queue_name,
        body=body,
        headers=message.headers,
        properties={"correlation_id": task_id},
    )


def task_args_json(rows: list[ClaimedRow]) -> bytes:
    """A batch task's positional arguments, `[[envelope, ...]]`, as JSON."""
    return orjson.dumps([[row.envelope for row in rows]])


class UnknownConsumer(LookupError):
    pass


_subscribers: dict[str, list[str]] = {}


def _subscribers_of(event_type: str) -> list[str]:
    # Handlers are registered at import time, before any relay runs.
    if event_type not in _subscribers:
        _subscribers[event_type] = consumer_registry.subscribers_of(event_type)
    return _subscribers[event_type]


def _targets_of(row: ClaimedRow) -> list[str]:
    if row.consumer:
        if row.consumer not in consumer_registry:
            # A redrive for a consumer this process does not know: keep the
            # row (with the error shown in the admin) rather than drop it.
            raise UnknownConsumer(f"outbox row targets unknown consumer {row.consumer!r}")
        return [row.consumer]
    if row.envelope["type"] not in event_registry:
        # This process has never heard of the type (an older relay during a
        # rolling deploy?): a newer relay may know its consumers. Keep it.
        raise UnknownConsumer(f"event type {row.envelope['type']!r} is not registered here")
    return _subscribers_of(row.envelope["type"])


def batch_messages(
    rows: list[ClaimedRow], batch_size: int, targets: dict[int, list[str]] | None = None
) -> list[OutgoingMessage]:
    """One message per consumer per `batch_size` of its rows, in outbox order.
    `targets` (outbox id -> consumers) saves working them out again."""
    by_consumer: dict[str, list[ClaimedRow]] = {}
    for row in rows:
        names = targets[row.outbox_id] if targets is not None else _targets_of(row)
        for name in names:
            by_consumer.setdefault(name, []).append(row)
    # A fanned-out event reaches each consumer in the same place of its list,
    # so consumers' batches are mostly the same rows: their bodies' argument
    # part is serialized once.
    args_json: dict[tuple[int, ...], bytes] = {}
    messages = []
    for name, targeted in by_consumer.items():
        for start in range(0, len(targeted), batch_size):
            chunk = targeted[start : start + batch_size]
            ids = tuple(row.outbox_id for row in chunk)
            if ids not in args_json:
                args_json[ids] = task_args_json(chunk)
            messages.append(build_task_message(name, chunk, args_json[ids]))
    return messages


def _retry_delay(attempts: int) -> float:
    # Capped exponential backoff with full jitter: a broker outage does not
    # turn every relay into a tight retry loop.
    return random.uniform(0, min(30.0, 0.5 * 2 ** min(attempts, 10)))


# A row the broker did not confirm goes back as it was, with one more attempt,
# the error and a backoff; its id is free again because the claim deleted it
# in this same transaction. The backoff counts from now, after the publish:
# `now()` is when the batch's transaction began, and a publish that waited
# out its confirm timeout (10 s) would have used the whole backoff up.
_RESTORE_SQL = (
    "INSERT INTO eventing_outboxmessage "
    "(id, consumer, created_at, available_at, claimed_until, attempts, last_error, event_id) "
    "VALUES (%s, %s, %s::timestamptz, clock_timestamp() + make_interval(secs => %s), "
    "NULL, %s, %s, %s);"
)


def _restore_failed(failures: dict[int, str], claims: dict[int, ClaimedRow]) -> None:
    if not failures:
        return
    params: list[Any] = []
    for outbox_id, error in failures.items():
        claim = claims[outbox_id]
        attempts = claim.attempts + 1
        params += [
            outbox_id,
            claim.consumer,
            claim.created_at,
            _retry_delay(attempts),
            attempts,
            error[:2000],
            claim.event_position,
        ]
    with connection.cursor() as cursor:
        cursor.execute(_RESTORE_SQL * len(failures), params)


def _settle(failed: dict[int, str], claims: dict[int, ClaimedRow]) -> None:
    """The end of a batch, before its commit: the claim already took every
    row out; those not published go back."""
    _restore_failed(failed, claims)


def clear_wake_for_run() -> None:
    """Clear the wake-up flag for a run about to claim (see `_CLEAR_WAKE_SQL`),
    in a transaction of its own; WakeBarrierBusy if a writer held the barrier
    too long (nothing cleared then)."""
    with connection.cursor() as cursor:
        try:
            _one_transaction(cursor, _CLEAR_WAKE_SQL, _clear_wake_params())
        except OperationalError as exc:
            _raise_if_barrier_busy(exc)
            raise


@contextlib.contextmanager
def _batch(
    limit: int, lease_seconds: float, *, clear_wake: bool
) -> Iterator[tuple[list[ClaimedRow], int]]:
    """A batch's transaction: claims (after clearing the wake-up flag, if
    asked), gives the block the claimed rows and the number dropped, and
    commits when the block ends, or rolls back if it raises.

    Outside a transaction the relay opens and ends it by hand: the clear, its
    commit, the BEGIN and the claim go to the server as one query string,
    and the COMMIT as one more (with `atomic()`, psycopg2 sends its BEGIN in
    a round trip of its own, and the clear needs its own transaction: four
    round trips in all, against two). In the string the clear is a
    transaction of its own (BEGIN ... COMMIT), and the claim runs in the one
    the second BEGIN opens. An error anywhere leaves an aborted transaction,
    which the ROLLBACK ends. Only cursor statements may run while it is open
    (`_no_atomic_inside`). Inside a caller's transaction (tests), the batch
    is a savepoint in it."""
    if connection.in_atomic_block:
        with transaction.atomic():
            if clear_wake:
                clear_wake_for_run()
            yield claim_batch(limit, lease_seconds)
            with connection.cursor() as cursor:
                # SET LOCALs outlive a released savepoint: the caller's
                # transaction gets its own settings back.
                cursor.execute(_SETTINGS_BACK)
        return
    # Explicit blocks both: a COMMIT ending the statements' implicit
    # transaction would commit too, but with a warning in the server's log.
    sql = ("BEGIN;" + _CLEAR_WAKE_SQL + "COMMIT;" if clear_wake else "") + "BEGIN;"
    sql += _NO_FLUSH_WAIT + _IDLE_LIMIT + _claim_sql()
    params = [*(_clear_wake_params() if clear_wake else []), int(lease_seconds * 1000), limit]
    claimed: tuple[list[ClaimedRow], int] = ([], 0)
    with connection.cursor() as cursor, connection.execute_wrapper(_no_atomic_inside):
        try:
            cursor.execute(sql, params)
            claimed = _claimed_or_dropped(cursor.fetchall())
            yield claimed
            cursor.execute("COMMIT")
            if cursor.statusmessage != "COMMIT":
                # A statement failed inside and its error was swallowed: the
                # server rolled back. Nothing is lost; say so loudly.
                raise BatchRolledBack(f"the batch ended in {cursor.statusmessage!r}")
        except OperationalError as exc:
            _rollback_quietly(cursor)
            _record_failed_attempt(claimed[0], exc)
            _raise_if_barrier_busy(exc)
            raise
        except BaseException as exc:
            _rollback_quietly(cursor)
            _record_failed_attempt(claimed[0], exc)
            raise


class BatchRolledBack(RuntimeError):
    """A batch's COMMIT found its transaction failed: its rows are back."""


class AtomicInsideBatch(RuntimeError):
    """Code inside a hand-opened batch transaction entered `atomic()`."""


# The settings a batch sets with SET LOCAL, back to the session's.
_SETTINGS_BACK = (
    "SET LOCAL idle_in_transaction_session_timeout = DEFAULT;"
    "SET LOCAL synchronous_commit = DEFAULT;"
)


def _no_atomic_inside(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    """Django does not know of the batch's transaction (it opened by hand):
    an `atomic()` inside would send a BEGIN onto it and then COMMIT it, rows
    and all, before their confirms. No code of the batch does; this refuses
    the first statement of any that would."""
    if connection.in_atomic_block:
        raise AtomicInsideBatch(
            "transaction.atomic() inside a relay batch's hand-opened transaction"
        )
    return execute(sql, params, many, context)


def _record_failed_attempt(rows: list[ClaimedRow], exc: BaseException) -> None:
    """After a batch failed as a whole (its rows are back), count the attempt
    and show the error on its rows, with a backoff, in a transaction of its
    own: otherwise a batch that keeps failing would be claimed again at once,
    with nothing to show in the admin. Best effort: the connection may be
    the thing that failed."""
    if not rows:
        return
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE eventing_outboxmessage SET attempts = attempts + 1, last_error = %s, "
                "available_at = clock_timestamp() + make_interval(secs => %s) "
                "WHERE id = ANY(%s::bigint[])",
                [
                    f"relay batch failed: {type(exc).__name__}: {exc}"[:2000],
                    _retry_delay(max(row.attempts for row in rows) + 1),
                    "{" + ",".join(str(row.outbox_id) for row in rows) + "}",
                ],
            )
    except Exception:
        logger.warning("relay: could not record the failed batch's attempt", exc_info=True)


def _rollback_quietly(cursor: Any) -> None:
    """End a batch's transaction after an error."""
    try:
        cursor.execute("ROLLBACK")
    except Exception:
        # The connection is gone, and its transaction with it.
        logger.debug("relay: rollback after a failed batch failed", exc_info=True)


def relay_batch(limit: int | None = None, *, clear_wake: bool = False) -> RelayReport:
    """Claim, publish and settle one batch, in one transaction (after clearing
    the wake-up flag, if asked)."""
    conf = settings.EVENTING
    report = RelayReport()
    # Connected before the batch's transaction opens: a slow connect would
    # count against the transaction's idle limit. Without a connection the
    # batch is still claimed, and its rows go back at once with the error
    # and a backoff, as after any failed publish (the admin and
    # `relay_outbox` show it).
    connect_error: PublishError | None = None
    try:
        get_publisher().connect()
    except PublishError as exc:
        connect_error = exc
    with _batch(
        limit or conf["RELAY_BATCH_SIZE"], conf["RELAY_LEASE_SECONDS"], clear_wake=clear_wake
    ) as (rows, report.dropped_rows):
        report.claimed_rows = len(rows) + report.dropped_rows
        # A claim of only orphan rows is still a claim: the run goes on.
        report.batches = 1 if report.claimed_rows else 0
        if report.dropped_rows:
            report.errors.append(
                f"{report.dropped_rows} outbox rows dropped: their stored events are gone"
            )
        if rows:
            _publish_claimed(rows, report, connect_error)
    return report


def _publish_claimed(
    rows: list[ClaimedRow], report: RelayReport, connect_error: PublishError | None = None
) -> None:
    """Publish the claimed rows (unless the broker could not be reached) and
    put back those not confirmed; fills in the report."""
    conf = settings.EVENTING
    report.batches = 1
    claims = {row.outbox_id: row for row in rows}
    targets: dict[int, list[str]] = {}
    failed: dict[int, str] = {}
    publishable = []
    for row in rows:
        try:
            targets[row.outbox_id] = _targets_of(row)
        except UnknownConsumer as exc:
            failed[row.outbox_id] = str(exc)
            continue
        publishable.append(row)
    per_row = {outbox_id: len(names) for outbox_id, names in targets.items()}
    outgoing = batch_messages(publishable, conf["CONSUMER_BATCH_SIZE"], targets)
    observation = observe.relay_publishing(rows, outgoing)  # [observability]
    try:
        if connect_error is not None:
            raise connect_error
        result = get_publisher().publish_batch(outgoing)
    except PublishError as exc:
        # Rows whose every message was confirmed before the failure are
        # delivered; the rest go back and retry (a duplicate at worst).
        result = exc.partial
        for outbox_id in per_row:
            if outbox_id not in result.confirmed:
                failed.setdefault(outbox_id, str(exc))
        report.errors.append(str(exc))
        report.publish_failed = True
        logger.warning("relay: publishing a batch of %d rows failed: %s", len(rows), exc)
    for outbox_id, reason in result.failed.items():
        failed.setdefault(outbox_id, reason)
    done = [
        outbox_id
        for outbox_id, expected in per_row.items()
        if outbox_id not in failed and (expected == 0 or outbox_id in result.confirmed)
    ]
    # A row neither failed nor confirmed cannot happen (publish_batch waits
    # for every confirm or raises); were it to, it goes back rather than vanish.
    for outbox_id in claims:
        if outbox_id not in failed and outbox_id not in done:
            failed[outbox_id] = "no confirm recorded"
    observe.relay_published(observation, done, failed)  # [observability]
    _settle(failed, claims)
    report.published_rows = len(done)
    report.broker_messages = sum(1 for m in outgoing if all(k in result.confirmed for k in m.keys))
    report.messages = sum(per_row[outbox_id] for outbox_id in done)
    report.failed_rows = len(failed)
    report.errors.extend(sorted(set(failed.values()) - set(report.errors)))
    if failed:
        logger.error("relay: %d rows not published: %s", len(failed), report.errors)


# A run that could not clear the wake-up flag sends one follow-up run this
# much later; a follow-up that cannot clear it either leaves it to beat.
FOLLOW_UP_SECONDS = 1.0


def relay(max_seconds: float | None = None, *, follow_up: bool = False) -> RelayReport:
    """Publish the outbox batch after batch until a claim comes back short
    (what is committed later has asked for a run of its own), a failure, or
    the time budget is spent. `follow_up`: this run was sent by one that
    could not clear the flag."""
    budget = settings.EVENTING["RELAY_MAX_SECONDS"] if max_seconds is None else max_seconds
    total = RelayReport()
    deadline = time.monotonic() + budget
    limit = settings.EVENTING["RELAY_BATCH_SIZE"]
    # Wake-ups rest on this: a writer that finds the flag set asks for no
    # wake-up, and holds the barrier shared until it commits; the clear waits
    # for such writers, so the claim that goes with it (in the transaction
    # after the clear's: see `_CLEAR_WAKE_SQL`) sees their rows. Writers that
    # come after the clear fail their try of the barrier, or find the flag
    # cleared, and ask for a run of their own. So after a clearing claim the
    # run only drains a backlog (claims again after a full claim); if that
    # claim finds nothing, one more claim looks again. A run that stops early (failed rows, the time
    # budget) asks for another run instead, unless the broker itself failed:
    # a wake-up could not be sent then, and beat's tick retries once the
    # broker is back.
    #
    # If a writer's transaction holds the wake-up barrier too long, the flag
    # stays set and the run goes on without clearing it. Writers that read it
    # set count on a run that clears it: this run tries once more when the
    # outbox is drained, and if the writer is still open it sends one
    # follow-up run a second later. A follow-up sends none (otherwise a long
    # transaction would keep chains of runs waiting on the barrier, one more
    # per beat tick); beat's tick is the run after it.
    try:
        return _run(total, deadline, limit, follow_up)
    except Exception:
        # A batch that failed rolled back: its rows are back in the outbox,
        # and the flag may be cleared (its clear commits first) with no run
        # asked for, or still set (the clear itself failed) so that commits
        # ask for none. Clear it if no writer holds the barrier, and send one
        # follow-up run a second later (none from a follow-up: beat's tick is
        # the run after it).
        _clear_wake_quietly()
        _send_follow_up(follow_up)
        raise


def _run(total: RelayReport, deadline: float, limit: int, follow_up: bool) -> RelayReport:
    cleared = True
    try:
        report = relay_batch(limit, clear_wake=True)
    except WakeBarrierBusy:
        logger.debug("relay: the wake-up flag stays set (a writer holds the barrier)")
        cleared = False
        report = relay_batch(limit)
    if report.batches == 0 and cleared:
        report = relay_batch(limit)
    retried_clear = False
    while True:
        total.published_rows += report.published_rows
        total.messages += report.messages
        total.broker_messages += report.broker_messages
        total.failed_rows += report.failed_rows
        total.dropped_rows += report.dropped_rows
        total.batches += report.batches
        total.errors.extend(report.errors)
        stopped_early = report.batches > 0 and (
            report.failed_rows > 0 or time.monotonic() >= deadline
        )
        if report.batches == 0 and not cleared and not retried_clear:
            retried_clear = True
            try:
                report = relay_batch(limit, clear_wake=True)
            except WakeBarrierBusy:
                total.flag_left_set = True
                _send_follow_up(follow_up)
                return total
            cleared = True
            if report.batches == 0:
                report = relay_batch(limit)  # the same rule as at the start
            continue
        if report.batches == 0 or stopped_early:
            # After a failed publish no wake-up could be sent: beat's tick
            # retries. Not cleared, the flag is set and asks for nothing.
            if stopped_early and not report.publish_failed:
                if cleared:
                    request_wake()
                else:
                    total.flag_left_set = True
                    _send_follow_up(follow_up)
            return total
        if cleared and report.claimed_rows < limit:
            # Not a backlog: the claim that went with the clear saw every
            # writer that counted on it, and every commit since has asked
            # for a run of its own (its try of the barrier failed, or it
            # found the flag cleared). That run claims what came in
            # meanwhile, in one batch; claiming it here, a few rows at a
            # time, sent every consumer a message per few rows.
            return total
        report = relay_batch(limit)


# -- wake-ups -----------------------------------------------------------------


def clear_wake() -> None:
    """Clear the wake-up flag unless a writer holds the barrier (see
    `_CLEAR_WAKE_IF_FREE_SQL`); never waits."""
    with connection.cursor() as cursor:
        _one_transaction(cursor, _CLEAR_WAKE_IF_FREE_SQL, [store.WAKE_BARRIER_KEY])


# How a commit wakes the relay (EVENTING["RELAY_WAKE"]): "celery" sends a
# relay task to the relay queue; "notify" sends a PostgreSQL NOTIFY on
# WAKE_CHANNEL, which a relay process (`manage.py relay_outbox --loop`)
# listens on. Either way only the commit that sets the wake-up flag sends
# one, and beat's tick stays the safety net. NOTIFY skips a Celery round trip
# (broker, the worker's main process, a pool process: ~5 ms here of the ~20
# from commit to read model at a low rate).
WAKE_BY_CELERY = "celery"
WAKE_BY_NOTIFY = "notify"
WAKE_CHANNEL = "eventing_relay_wake"

# One round trip whether the flag was set or not. While the relay is busy
# most commits find it set: the UPDATE's condition is then false, no row is
# locked or written. The flag needs no durability (a flip lost in a crash
# costs one wake-up, and beat's tick covers it), so this little transaction
# never waits for a WAL flush: `synchronous_commit` is read at its commit.
_REQUEST_WAKE_SQL = """
WITH flipped AS (
    UPDATE eventing_relaywake SET requested = true WHERE id = 1 AND NOT requested RETURNING id
)
SELECT EXISTS (SELECT 1 FROM flipped), EXISTS (SELECT 1 FROM eventing_relaywake WHERE id = 1),
    set_config('synchronous_commit', 'off', true) IS NOT NULL{notify}
"""
# PostgreSQL delivers the NOTIFY when this statement's transaction commits,
# and only if the UPDATE flipped the flag.
_NOTIFY_IF_FLIPPED = ", (SELECT count(pg_notify(%s, '')) FROM flipped) > 0"
_REQUEST_WAKE_BY_CELERY_SQL = _REQUEST_WAKE_SQL.format(notify="")
_REQUEST_WAKE_BY_NOTIFY_SQL = _REQUEST_WAKE_SQL.format(notify=_NOTIFY_IF_FLIPPED)


def wakes_by_notify() -> bool:
    return settings.EVENTING["RELAY_WAKE"] == WAKE_BY_NOTIFY


def request_wake() -> None:
    """Runs after a commit that appended events: ask for a relay run unless one
    is already asked for (coalescing a burst of commits into one message)."""
    notify = wakes_by_notify()
    try:
        with connection.cursor() as cursor:
            if notify:
                cursor.execute(_REQUEST_WAKE_BY_NOTIFY_SQL, [WAKE_CHANNEL])
            else:
                cursor.execute(_REQUEST_WAKE_BY_CELERY_SQL)
            flipped, exists, *_ = cursor.fetchone()
            first = flipped
            if not exists:
                # The row is gone (a test's teardown truncated it): recreate it.
                cursor.execute(
                    "INSERT INTO eventing_relaywake (id, requested) VALUES (1, true) "
                    "ON CONFLICT (id) DO UPDATE SET requested = true "
                    "WHERE NOT eventing_relaywake.requested"
                )
                first = cursor.rowcount == 1
                if first and notify:
                    cursor.execute("SELECT pg_notify(%s, '')", [WAKE_CHANNEL])
        if not first or notify:
            return
        from .tasks import relay_task

        relay_task.apply_async(queue=settings.EVENTING_RELAY_QUEUE, retry=False, expires=30)
    except Exception:
        logger.warning("relay wake-up not sent; the beat tick will publish", exc_info=True)
        _clear_wake_quietly()


def consumers_behind() -> bool:
    """Whether a consumer queue holds messages its workers have not taken:
    they are behind, and a relay process that publishes again at once only
    adds more, smaller batches (see `relay_outbox --loop`'s linger)."""
    queue_names = [
        queue.name
        for queue in get_publisher().queues
        if queue.name != settings.EVENTING_RELAY_QUEUE
    ]
    return get_publisher().ready_messages(queue_names) > 0


class WakeListener:
    """What a relay process waits on between runs: a NOTIFY on WAKE_CHANNEL
    (a commit that set the wake-up flag), or its idle interval running out.

    LISTENs on a PostgreSQL connection of its own, in autocommit and outside
    Django's connection handling, so the relay's transactions never delay a
    notification's arrival. A notification sent while a run is under way
    waits on that connection, and the next `wait()` returns at once: none is
    lost between runs. If the connection fails, `wait()` makes a new one and
    returns True, so the caller runs again and catches up on what was
    committed while nobody listened.
    """

    def __init__(self) -> None:
        self._conn: Any = None

    def listen(self) -> None:
        conn = connection.get_new_connection(connection.get_connection_params())
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"LISTEN {WAKE_CHANNEL}")
        self._conn = conn

    def wait(self, timeout: float) -> bool:
        """True if woken (or the connection was made again), False at the timeout."""
        try:
            if self._conn is None:
                self.listen()
                return True
            ready, _, _ = select.select([self._conn], [], [], timeout)
            if not ready:
                return False
            self._conn.poll()
            woken = bool(self._conn.notifies)
            self._conn.notifies.clear()
            return woken
        except (DatabaseError, OSError, psycopg2.Error):
            logger.warning("relay: the wake-up listener's connection failed", exc_info=True)
            self.close()
            time.sleep(min(timeout, 1.0))  # not a tight loop while PostgreSQL is down
            return True

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def _send_follow_up(follow_up: bool) -> None:
    if follow_up:
        logger.info("relay: the wake-up flag stays set for beat's tick (the barrier is held)")
        return
    from .tasks import relay_task

    try:
        relay_task.apply_async(
            kwargs={"follow_up": True},
            queue=settings.EVENTING_RELAY_QUEUE,
            countdown=FOLLOW_UP_SECONDS,
            retry=False,
            expires=30,
        )
    except Exception:
        logger.warning("relay: follow-up run not sent; beat's tick runs", exc_info=True)


def _clear_wake_quietly() -> None:
    """Clear the flag so that the next commit asks for a wake-up again."""
    try:
        clear_wake()
    except Exception:
        logger.debug("could not clear the wake flag", exc_info=True)
