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
from collections.abc import Callable
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction

from . import context, observe
from .events import DomainEvent, UnknownEventType, UnknownEventVersion
from .events import registry as event_registry
from .models import Checkpoint, DeadLetter, OutboxMessage, StoredEvent
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
    def of(cls, row: StoredEvent, *, consumer: str, replaying: bool = False) -> EventMeta:
        return cls(
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


@dataclasses.dataclass
class ConsumerSpec:
    name: str
    handlers: dict[str, list[HandlerSpec]] = dataclasses.field(default_factory=dict)

    @property
    def queue_name(self) -> str:
        return f"{settings.EVENTING['QUEUE_PREFIX']}{self.name}"

    @property
    def task_name(self) -> str:
        return f"{self.name}.handle_event"


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
        name = consumer
        if name is None:
            app_config = apps.get_containing_app_config(func.__module__)
            if app_config is None:
                raise LookupError(f"{func.__module__} is in no installed app; pass consumer=")
            name = app_config.label
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


def check_not_paused(consumer: str) -> None:
    """Caller holds a transaction. Takes the consumer's lock shared and fails
    with ConsumerPaused if a replay paused it."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_xact_lock_shared(%s), "
            "(SELECT paused FROM eventing_consumerstate WHERE consumer = %s)",
            [consumer_lock_key(consumer), consumer],
        )
        _, paused = cursor.fetchone()
    if paused:
        raise ConsumerPaused(f"consumer {consumer} is paused")


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


def apply_event(spec: ConsumerSpec, row: StoredEvent, *, replaying: bool = False) -> None:
    """Run the consumer's handlers for one stored event. Caller holds the
    transaction (and, on the live path, the checkpoint lock)."""
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
                # A savepoint per handler keeps a failing handler from leaving
                # the transaction aborted under the checkpoint update.
                with (
                    transaction.atomic(),
                    context.scope(in_handler=True, side_effects=handler.side_effects),
                ):
                    handler.func(event, meta)
            except HandlerFailed:
                raise
            except Exception as exc:
                raise HandlerFailed(row, exc) from exc


def process_message(consumer: str, message: Any) -> Outcome:
    """Apply one delivered message. Raises HandlerFailed or PermanentFailure."""
    spec = registry.get(consumer)
    aggregate_type, aggregate_id, version, event_id = parse_message(message)
    with transaction.atomic():
        check_not_paused(consumer)
        checkpoint = lock_checkpoint(consumer, aggregate_type, aggregate_id)
        if checkpoint.parked:
            return Outcome("parked")
        if version <= checkpoint.version:
            Checkpoint.objects.filter(pk=checkpoint.pk).update(duplicates=checkpoint.duplicates + 1)
            observe.duplicate_skipped(consumer)  # [observability]
            return Outcome("duplicate")
        rows = StoredEvent.objects.filter(
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            version__gt=checkpoint.version,
            version__lte=version,
        ).order_by("version")
        rows = list(rows)
        target = rows[-1] if rows else None
        if target is None or target.version != version or str(target.event_id) != event_id:
            raise PermanentFailure(
                f"message names event {event_id} at {aggregate_type}/{aggregate_id} v{version}, "
                "which is not in the event store"
            )
        expected = checkpoint.version + 1
        for row in rows:
            if row.version != expected:
                raise PermanentFailure(
                    f"store gap: {aggregate_type}/{aggregate_id} lacks v{expected}"
                )
            apply_event(spec, row)
            expected += 1
        checkpoint.version = version
        checkpoint.save(update_fields=["version", "updated_at"])
    return Outcome("applied", applied=len(rows))


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
    explicit and stable whatever module layout changes come later.
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
        try:
            outcome = process_message(consumer, message)
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
        except PermanentFailure as exc:
            dead_letter(consumer, message, str(exc), tb.format_exc(), attempt, None)
            logger.error("%s: invalid message dead-lettered: %s", consumer, exc)
            return "invalid"
        except HandlerFailed as exc:
            if isinstance(exc.error, OperationalError | InterfaceError):
                # Same as above, raised while a handler ran: not the event's fault.
                _transient_database_error(consumer, exc.error)
                raise self.retry(countdown=retry_delay(1), kwargs={"failures": failures}) from exc
            observe.handler_failed(consumer, exc)  # [observability]
            max_attempts = settings.EVENTING["MAX_ATTEMPTS"]
            if exc.permanent or attempt >= max_attempts:
                dead_letter(consumer, message, str(exc), exc.traceback, attempt, exc.event)
                logger.error(
                    "%s: event %s dead-lettered after %d attempts: %s",
                    consumer,
                    exc.event.event_id,
                    attempt,
                    exc,
                )
                return "dead-lettered"
            countdown = retry_delay(attempt)
            observe.handler_retrying(consumer, exc)  # [observability]
            logger.warning(
                "%s: event %s failed (attempt %d/%d), retrying in %.2fs: %s",
                consumer,
                exc.event.event_id,
                attempt,
                max_attempts,
                countdown,
                exc,
            )
            raise self.retry(countdown=countdown, kwargs={"failures": attempt}) from exc
        return outcome.status

    return handle_event
