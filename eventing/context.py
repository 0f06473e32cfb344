"""Ambient metadata for events appended in the current unit of work.

The web middleware sets correlation id, actor and traceparent for a request;
the consumer runtime sets them (plus causation and chain depth) while a handler
runs, so events emitted by a handler carry the handled event's id as their
causation id and its correlation id.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import uuid
from collections.abc import Iterator

from django.db import transaction


@dataclasses.dataclass(frozen=True)
class EventContext:
    correlation_id: str | None = None
    causation_id: str | None = None
    actor: str = ""
    traceparent: str = ""
    chain_depth: int = 0
    # True while `replay_events` runs handlers: outside effects are skipped.
    replaying: bool = False
    # Set while a handler runs; `side_effects` mirrors its declaration.
    in_handler: bool = False
    side_effects: bool = False


_current: contextvars.ContextVar[EventContext] = contextvars.ContextVar(
    "eventing_context",
    default=EventContext(),  # noqa: B039 - frozen dataclass: immutable
)


def current() -> EventContext:
    return _current.get()


@contextlib.contextmanager
def use(ctx: EventContext) -> Iterator[EventContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


@contextlib.contextmanager
def scope(**changes: object) -> Iterator[EventContext]:
    ctx = dataclasses.replace(current(), **changes)  # type: ignore[arg-type]
    with use(ctx) as active:
        yield active


def new_correlation_id() -> str:
    return str(uuid.uuid4())


def atomic_step(*, savepoint: bool = True) -> transaction.Atomic:
    """`transaction.atomic()` for one step of a larger unit of work.

    Inside a consumer's handler (or a replay) it takes no savepoint: the
    batch's transaction is the unit, a failure rolls it back whole and the
    lane is retried, and a savepoint would cost two round trips per step (a
    policy that saves several aggregates paid ten). A handler that wants to
    catch a failed step and go on opens its own `transaction.atomic()` around
    it. Anywhere else it is plain `transaction.atomic()`: nested, a failure
    rolls back to its savepoint and the caller's transaction stays usable.
    """
    return transaction.atomic(savepoint=savepoint and not current().in_handler)
