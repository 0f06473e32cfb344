"""Tables of the platform: the event store, the outbox, consumer checkpoints
and dead letters, plus the abstract base of event-emitting models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

from django.db import models
from django.utils import timezone

from . import context, rows
from .events import DomainEvent


class StoredEvent(models.Model):
    """One immutable event. The database refuses UPDATE and DELETE on this table
    (trigger in migration 0002); only TRUNCATE, which tests use, can clear it.

    `position` is the global order (a sequence: unique and increasing, with
    gaps where a transaction rolled back). `(aggregate_type, aggregate_id,
    version)` is unique: a stream's versions are 1..n without gap because the
    writer appends `expected_version + 1` and two writers cannot both insert it.
    """

    position = models.BigAutoField(primary_key=True)
    event_id = models.UUIDField(unique=True)
    aggregate_type = models.CharField(max_length=100)
    aggregate_id = models.CharField(max_length=100)
    version = models.PositiveIntegerField()
    event_type = models.CharField(max_length=150)
    schema_version = models.PositiveSmallIntegerField()
    payload = models.JSONField()
    source = models.CharField(max_length=200)
    time = models.DateTimeField(default=timezone.now)
    correlation_id = models.CharField(max_length=64)
    causation_id = models.CharField(max_length=64, blank=True, default="")
    traceparent = models.CharField(max_length=64, blank=True, default="")
    actor = models.CharField(max_length=150, blank=True, default="")
    chain_depth = models.PositiveSmallIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["aggregate_type", "aggregate_id", "version"], name="event_stream_version"
            )
        ]
        # Every index is written by every append. Lookups by type and by
        # correlation are equality (or `= ANY`), so plain btrees: `db_index`
        # on a CharField would add a second, `varchar_pattern_ops` index for
        # LIKE that no query uses.
        indexes = [
            models.Index(fields=["aggregate_id"], name="event_aggregate_id"),
            models.Index(fields=["event_type"], name="stored_event_type"),
            models.Index(fields=["correlation_id"], name="stored_event_correlation"),
        ]
        ordering = ["position"]

    def __str__(self) -> str:
        stream = f"{self.aggregate_type}/{self.aggregate_id}"
        return f"#{self.position} {self.event_type} {stream} v{self.version}"

    @property
    def stream(self) -> tuple[str, str]:
        return (self.aggregate_type, self.aggregate_id)

    def envelope(self) -> dict[str, Any]:
        """The wire form: CloudEvents 1.0 attribute names where one fits."""
        return {
            "specversion": "1.0",
            "id": str(self.event_id),
            "source": self.source,
            "type": self.event_type,
            "subject": f"{self.aggregate_type}/{self.aggregate_id}",
            "time": self.time.isoformat(),
            "datacontenttype": "application/json",
            "dataschemaversion": self.schema_version,
            "aggregatetype": self.aggregate_type,
            "aggregateid": self.aggregate_id,
            "aggregateversion": self.version,
            "position": self.position,
            "correlationid": self.correlation_id,
            "causationid": self.causation_id,
            "traceparent": self.traceparent,
            "actor": self.actor,
            "chaindepth": self.chain_depth,
            "data": self.payload,
        }


class OutboxMessage(models.Model):
    """An event waiting to be published. Rows leave once the broker confirmed.

    `consumer` empty means "every subscribed consumer"; a name targets one
    consumer (a redrive). The relay takes a row out in its batch's transaction
    and puts it back if the broker did not confirm it (see `eventing.relay`).
    `claimed_until` is the lease of relays before that design: a row leased by
    one is skipped until the lease runs out. This relay writes NULL.
    """

    id = models.BigAutoField(primary_key=True)
    # No foreign-key constraint and no index: the append inserts the row from
    # the positions its own INSERT returned, and stored events are never
    # deleted (a trigger refuses it), so the reference cannot dangle. The
    # constraint's check ran at every commit (a query and a row lock on the
    # stored event per outbox row), and nothing looks outbox rows up by event.
    event = models.ForeignKey(
        StoredEvent,
        on_delete=models.PROTECT,
        related_name="+",
        db_constraint=False,
        db_index=False,
    )
    consumer = models.CharField(max_length=100, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    available_at = models.DateTimeField(default=timezone.now)
    claimed_until = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        indexes = [models.Index(fields=["available_at", "id"], name="outbox_available")]
        ordering = ["id"]

    def __str__(self) -> str:
        return f"outbox #{self.id} -> event #{self.event_id}"


class RelayWake(models.Model):
    """A single row: `requested` is true while a wake-up message is in flight.

    Commits set it and send a wake-up only when it was false, so a burst of
    commits sends one message; the relay clears it before draining, so a commit
    that lands after the drain started sends a fresh wake-up. Losing the message
    leaves it set: the beat tick clears it within a second.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    requested = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"relay wake requested={self.requested}"


class Checkpoint(models.Model):
    """How far one consumer got in one aggregate's stream: the lane.

    Invariant: `version` advances only in the transaction that applied the
    consumer's handlers for every event up to it, and only by one at a time.
    """

    consumer = models.CharField(max_length=100)
    aggregate_type = models.CharField(max_length=100)
    aggregate_id = models.CharField(max_length=100)
    version = models.PositiveIntegerField(default=0)
    duplicates = models.PositiveIntegerField(default=0)
    parked = models.BooleanField(default=False)
    parked_reason = models.TextField(blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["consumer", "aggregate_type", "aggregate_id"], name="checkpoint_lane"
            )
        ]
        indexes = [
            models.Index(
                fields=["consumer"], condition=models.Q(parked=True), name="checkpoint_parked"
            )
        ]

    def __str__(self) -> str:
        state = " (parked)" if self.parked else ""
        return f"{self.consumer} @ {self.aggregate_type}/{self.aggregate_id} v{self.version}{state}"


class ConsumerState(models.Model):
    """Per consumer: paused while `replay_events` rebuilds its read models.

    A paused consumer's messages are retried later, not applied and not lost;
    its checkpoints stay still, so the rebuild sees a fixed point. See
    `eventing.replay.paused` for the lock that makes the pause exact.
    """

    consumer = models.CharField(max_length=100, primary_key=True)
    paused = models.BooleanField(default=False)
    paused_reason = models.TextField(blank=True, default="")
    paused_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.consumer} ({'paused' if self.paused else 'running'})"


class DeadLetter(models.Model):
    class Status(models.TextChoices):
        OPEN = "open"
        REDRIVEN = "redriven"
        DISCARDED = "discarded"

    consumer = models.CharField(max_length=100)
    # Null when the message named no stored event (a forged or malformed one).
    event = models.ForeignKey(
        StoredEvent, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    message = models.JSONField(null=True, blank=True)
    error = models.TextField()
    traceback = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.OPEN)
    created_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=150, blank=True, default="")
    resolution_note = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["consumer", "event"],
                condition=models.Q(status="open"),
                name="dead_letter_open_once",
            )
        ]

    def __str__(self) -> str:
        return f"dead letter {self.consumer} #{self.event_id}: {self.error[:60]}"


class EventEmissionRequired(RuntimeError):
    """A bulk write would change an event-emitting model without its events."""


class EventSourcedQuerySet(models.QuerySet):
    """Refuses the writes that skip `save()` and so would skip the events."""

    def _refuse(self, operation: str) -> EventEmissionRequired:
        model = self.model.__name__
        return EventEmissionRequired(
            f"{model}.objects.{operation}() bypasses event emission. Load each "
            f"{model}, call its domain method (which records the event), then save() it, "
            f"or use the {model} service functions."
        )

    def update(self, **kwargs: Any) -> int:
        raise self._refuse("update")

    def bulk_create(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("bulk_create")

    def bulk_update(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("bulk_update")

    def delete(self) -> Any:
        raise self._refuse("delete")

    def update_or_create(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("update_or_create")


class EventSourcedModel(models.Model):
    """Base of a write model whose changes are recorded as domain events.

    Domain methods change fields and `record()` events; `save()` writes the row
    and appends the events to the store and the outbox in one transaction.
    `version` is the aggregate's stream version; a writer holding a stale
    instance fails with `ConcurrencyError` instead of silently winning. Nested
    in a transaction, a failed update rolls back to its own savepoint, except
    inside a consumer's handler, where it fails the batch (`atomic_step`); a
    failed insert fails the enclosing transaction, as a plain Django save does.
    """

    aggregate_type: ClassVar[str] = ""

    version = models.PositiveIntegerField(default=0, editable=False)

    objects = EventSourcedQuerySet.as_manager()

    class Meta:
        abstract = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_events: list[DomainEvent] = []

    @property
    def aggregate_id(self) -> str:
        return str(self.pk)

    def record(self, event: DomainEvent) -> None:
        if event.aggregate_type != self.aggregate_type:
            raise ValueError(
                f"{type(event).__name__} belongs to {event.aggregate_type!r}, "
                f"not {self.aggregate_type!r}"
            )
        self._pending_events.append(event)

    @property
    def pending_events(self) -> list[DomainEvent]:
        return list(self._pending_events)

    def save(self, *args: Any, **kwargs: Any) -> None:
        from . import store

        pending = self._pending_events
        expected_version = self.version
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and pending:
            kwargs["update_fields"] = {*update_fields, "version"}
        # Nested, an update takes a savepoint: one that lost a race
        # (ConcurrencyError) rolls back alone and the caller's transaction
        # stays usable, e.g. to reload and retry. An insert takes none, like a
        # plain Django save (a failed insert fails the enclosing transaction):
        # a second writer of a new aggregate collides on the row's own key
        # before its events, so there is no race of that kind to recover from,
        # and placing an order saves two round trips.
        with context.atomic_step(savepoint=not self._state.adding):
            self.version = expected_version + len(pending)
            try:
                write_row: Callable[[], None] | None = functools.partial(
                    super().save, *args, **kwargs
                )
                if not pending or self.pk is None:
                    # Without events, or with a key the database assigns (the
                    # stream's id is known only once the row is written), the
                    # row goes first, on its own.
                    write_row()
                    write_row = None
                if pending:
                    # Otherwise the row's write runs inside the append, which
                    # rides along with it when it is an INSERT (one round trip).
                    store.append(
                        aggregate_type=self.aggregate_type,
                        aggregate_id=self.aggregate_id,
                        expected_version=expected_version,
                        events=pending,
                        along_with=write_row,
                        table=self._meta.db_table,
                        key=self.pk,
                    )
            except BaseException:
                self.version = expected_version
                raise
        self._pending_events = []
        # A batch's later steps get this instance (eventing.rows).
        rows.saved(self)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise EventEmissionRequired(
            f"{type(self).__name__}.delete() would remove an aggregate without an event; "
            "record a domain event (cancel, retire, ...) instead."
        )


class ConsumerLagSample(models.Model):
    """A consumer's lag at one moment, for the dashboard's last-hour chart.

    Lag has no history anywhere else (a checkpoint only knows where its lane
    is now), so the `eventing.sample_lag` beat task writes one row per consumer
    every `EVENTING_LAG_SAMPLE_SECONDS` and deletes rows older than a day. A
    doubled beat writes two rows a minute; the chart takes the larger.
    """

    consumer = models.CharField(max_length=100)
    sampled_at = models.DateTimeField(default=timezone.now)
    lag_events = models.PositiveIntegerField()
    oldest_age_seconds = models.FloatField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["sampled_at"], name="lag_sample_time")]
        ordering = ["sampled_at", "consumer"]

    def __str__(self) -> str:
        return f"{self.consumer} lag {self.lag_events} at {self.sampled_at:%H:%M:%S}"
