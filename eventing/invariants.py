"""Invariants: statements about the whole system that must hold once it has settled.

`manage.py eventing_check` and the fault tests run every registered invariant
against one consistent snapshot of the database (a REPEATABLE READ, read-only
transaction) and report each violation on its own line, with the ids a person
needs to look it up.

The platform's own invariants (every event published, every subscribed event
applied by each consumer, no parked lane...) live in `eventing.checks_runtime`.
A business app adds its own in `<app>/invariants.py`, found by autodiscovery,
so eventing never imports a business app:

    @invariant("inventory.stock_conserved")
    def stock_conserved(ctx: CheckContext) -> Iterator[Violation]:
        ...
        yield Violation(f"{sku}: received {received} != on hand + shipped {kept}", sku=sku)

An invariant sees `ctx.cutoff`: state produced by events younger than that may
legitimately still be in flight (a consumer has not applied them yet), so
invariants that compare across asynchronous boundaries skip it. With
`grace=0` (what the tests use once the flow has settled) nothing is in flight.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from django.db import connection, transaction
from django.utils import timezone
from django.utils.module_loading import autodiscover_modules

logger = logging.getLogger(__name__)


class Violation:
    """One thing that is wrong, with the ids to find it (`order=..., sku=...`)."""

    __slots__ = ("ids", "message")

    def __init__(self, message: str, **ids: Any) -> None:
        self.message = message
        self.ids = {key: str(value) for key, value in ids.items()}

    def __repr__(self) -> str:
        return f"Violation({self.message!r}, {self.ids!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Violation) and (self.message, self.ids) == (
            other.message,
            other.ids,
        )

    def __hash__(self) -> int:
        return hash((self.message, tuple(sorted(self.ids.items()))))


@dataclasses.dataclass(frozen=True)
class CheckContext:
    now: dt.datetime
    grace: dt.timedelta

    @property
    def cutoff(self) -> dt.datetime:
        """Events at or before this time must have had their effects everywhere."""
        return self.now - self.grace

    def settled(self, moment: dt.datetime | None) -> bool:
        return moment is not None and moment <= self.cutoff


Check = Callable[[CheckContext], Iterable[Violation]]


@dataclasses.dataclass(frozen=True)
class Invariant:
    name: str
    func: Check
    description: str


@dataclasses.dataclass
class Result:
    name: str
    description: str
    violations: list[Violation]
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations and not self.error


@dataclasses.dataclass
class Report:
    generated_at: dt.datetime
    grace_seconds: float
    results: list[Result]

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results)

    @property
    def violation_count(self) -> int:
        return sum(len(r.violations) + bool(r.error) for r in self.results)

    def lines(self) -> list[str]:
        """One line per violation: `invariant: message [key=value ...]`."""
        out = []
        for result in self.results:
            if result.error:
                out.append(f"{result.name}: the check itself failed: {result.error}")
            for violation in result.violations:
                ids = " ".join(f"{k}={v}" for k, v in violation.ids.items())
                out.append(f"{result.name}: {violation.message}" + (f" [{ids}]" if ids else ""))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "generated_at": self.generated_at.isoformat(),
            "grace_seconds": self.grace_seconds,
            "violations": self.violation_count,
            "invariants": [
                {
                    "name": r.name,
                    "description": r.description,
                    "ok": r.ok,
                    "seconds": round(r.seconds, 3),
                    "error": r.error,
                    "violations": [{"message": v.message, "ids": v.ids} for v in r.violations],
                }
                for r in self.results
            ],
        }


class InvariantRegistry:
    def __init__(self) -> None:
        self._invariants: dict[str, Invariant] = {}
        self._discovered = False

    def register(self, name: str, func: Check) -> None:
        existing = self._invariants.get(name)
        if existing is not None and existing.func is not func:
            raise ValueError(
                f"invariant {name!r} is registered twice: {existing.func.__module__} and "
                f"{func.__module__}"
            )
        doc = (func.__doc__ or "").strip().split("\n\n")[0]
        self._invariants[name] = Invariant(name, func, " ".join(doc.split()))

    def discover(self) -> None:
        """Import `eventing.checks_runtime` and every installed app's `invariants`."""
        if self._discovered:
            return
        from . import checks_runtime  # noqa: F401 - registers the platform's invariants

        autodiscover_modules("invariants")
        self._discovered = True

    def all(self) -> list[Invariant]:
        self.discover()
        return [self._invariants[name] for name in sorted(self._invariants)]

    def names(self) -> list[str]:
        return [inv.name for inv in self.all()]


registry = InvariantRegistry()


def invariant(name: str) -> Callable[[Check], Check]:
    """Register `func(ctx) -> Iterable[Violation]` under a stable, dotted name."""

    def decorator(func: Check) -> Check:
        registry.register(name, func)
        return func

    return decorator


def run(*, grace_seconds: float = 60.0, only: Iterable[str] | None = None) -> Report:
    """Run the invariants (all, or those named in `only`) on one snapshot.

    A check that raises is reported as failed (never as passing), with its
    traceback logged; the others still run.
    """
    invariants = registry.all()
    if only is not None:
        wanted = set(only)
        unknown = wanted - {inv.name for inv in invariants}
        if unknown:
            raise LookupError(
                f"unknown invariant(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(inv.name for inv in invariants)}"
            )
        invariants = [inv for inv in invariants if inv.name in wanted]
    results = []
    nested = connection.in_atomic_block
    with transaction.atomic():
        # One snapshot for every check: an order and its events, a stock item
        # and its reservations are read as of the same instant. (Inside a
        # caller's transaction, e.g. a rolled-back test, that one is used.)
        with connection.cursor() as cursor:
            if not nested:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cursor.execute("SELECT clock_timestamp()")
            (now,) = cursor.fetchone()
        ctx = CheckContext(now=now or timezone.now(), grace=dt.timedelta(seconds=grace_seconds))
        for inv in invariants:
            started = time.monotonic()
            try:
                with transaction.atomic():  # a savepoint: a failing check spoils no other
                    violations = list(inv.func(ctx))
                error = ""
            except Exception as exc:
                logger.exception("invariant %s raised", inv.name)
                violations = []
                error = f"{type(exc).__name__}: {exc} ({traceback.format_exc(limit=1).strip()})"
            results.append(
                Result(inv.name, inv.description, violations, time.monotonic() - started, error)
            )
    return Report(generated_at=ctx.now, grace_seconds=grace_seconds, results=results)
