"""Event types: a registry of stable names, schema versions and upcasters.

An event type is a frozen dataclass whose fields are the payload (ids and
values, never ORM objects). Its `name` is a stable, append-only string; its
`version` is the current schema version. Stored payloads keep the version they
were written with; `upcast()` chains registered upcasters so a handler always
receives the current shape.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import functools
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]


class UnknownEventType(LookupError):
    """A stored or delivered event names a type this process does not know."""


class UnknownEventVersion(LookupError):
    """A payload's schema version has no upcaster path to the current one."""


class DuplicateEventName(ValueError):
    """Two event classes claim the same stable name."""


@dataclasses.dataclass(frozen=True)
class DomainEvent:
    """Base class of every event type. Subclasses are frozen dataclasses."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    aggregate_type: ClassVar[str] = ""

    def to_payload(self) -> Payload:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_payload(cls, payload: Payload) -> DomainEvent:
        field_names, required = _shape(cls)
        # Set operations on the keys (in C): decoding runs per event in replay.
        keys = payload.keys()
        if not keys >= required:
            missing = sorted(required - keys)
            raise ValueError(f"{cls.name} v{cls.version} payload lacks {', '.join(missing)}")
        if keys <= field_names:
            return cls(**payload)
        return cls(**{k: v for k, v in payload.items() if k in field_names})


@functools.cache
def _shape(cls: type[DomainEvent]) -> tuple[frozenset[str], frozenset[str]]:
    """An event class's field names and the ones without a default (decoding
    runs per event in replay: worked out once per class)."""
    fields = dataclasses.fields(cls)
    required = frozenset(
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    return frozenset(f.name for f in fields), required


def _jsonable(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


E = TypeVar("E", bound=type[DomainEvent])


class EventRegistry:
    """Name -> class, plus upcasters keyed by (name, from_version).

    Names are append-only: a retired event stays registered so that stored
    events of that type remain readable.
    """

    def __init__(self) -> None:
        self._types: dict[str, type[DomainEvent]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self.duplicates: list[str] = []

    def register(self, cls: E) -> E:
        if not cls.name or not cls.aggregate_type:
            raise TypeError(f"{cls.__qualname__} needs class attributes name and aggregate_type")
        existing = self._types.get(cls.name)
        if existing is not None and existing is not cls:
            # Recorded rather than raised at import so the system check can
            # report every clash at once with both culprits named.
            self.duplicates.append(
                f"{cls.name}: {existing.__module__}.{existing.__qualname__} and "
                f"{cls.__module__}.{cls.__qualname__}"
            )
            return cls
        self._types[cls.name] = cls
        return cls

    def upcaster(self, cls: type[DomainEvent], from_version: int) -> Callable[[Upcaster], Upcaster]:
        def decorator(fn: Upcaster) -> Upcaster:
            self._upcasters[(cls.name, from_version)] = fn
            return fn

        return decorator

    def get(self, name: str) -> type[DomainEvent]:
        try:
            return self._types[name]
        except KeyError:
            raise UnknownEventType(f"unknown event type {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def all(self) -> dict[str, type[DomainEvent]]:
        return dict(self._types)

    def missing_upcasters(self) -> list[str]:
        """Every (type, version) step from 1 to current that has no upcaster."""
        gaps = []
        for name, cls in self._types.items():
            for version in range(1, cls.version):
                if (name, version) not in self._upcasters:
                    gaps.append(f"{name} v{version}->v{version + 1}")
        return gaps

    def upcast(self, name: str, schema_version: int, payload: Payload) -> Payload:
        cls = self.get(name)
        if schema_version < 1 or schema_version > cls.version:
            raise UnknownEventVersion(
                f"{name} has schema version {schema_version}; this process knows 1..{cls.version}"
            )
        for version in range(schema_version, cls.version):
            step = self._upcasters.get((name, version))
            if step is None:
                raise UnknownEventVersion(f"no upcaster for {name} v{version}->v{version + 1}")
            payload = step(dict(payload))
        return payload

    def decode(self, name: str, schema_version: int, payload: Payload) -> DomainEvent:
        cls = self.get(name)
        return cls.from_payload(self.upcast(name, schema_version, payload))


registry = EventRegistry()


def event(cls: E) -> E:
    """Class decorator: make `cls` a frozen dataclass and register it."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    return registry.register(cls)


upcaster = registry.upcaster
