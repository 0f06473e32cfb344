"""Batched read-model rows: load a batch's rows in one query, write them in one.

A projection handler that reads and rewrites one row per event (the order
summary, say) costs a SELECT and an UPDATE per event. Inside a unit of work
(a consumer batch, a replay chunk) the runtime instead prefetches every row the
events will touch, keyed by the aggregate id they derive from, and the handlers
get and put those instances in memory; `take_dirty()` gives the one
INSERT ... ON CONFLICT DO UPDATE per read model that writes the changed ones,
for the caller to run before it commits.

Invariants:
- A unit of work lives inside one transaction and its writes run before it
  commits (with the checkpoint's move), so rows and checkpoint commit together.
- Within it, `get(key)` returns the same instance every time: events applied
  later in the batch see what earlier ones put.
- A key is locked (a transaction-level advisory lock) before its row is read,
  whether the row exists or not: whoever writes these rows goes through here.
- Outside a unit of work (a handler called directly), `get` locks and reads
  one row and `put` saves it at once: the same handler code, unbatched.
- Only handlers of the read model's projection may write its rows while a unit
  of work is open; others would be overwritten by its writes.

Locked aggregates (`lock_aggregates`, `hold_locked`) are the write side's
counterpart for a consumer's policies: a batch locks FOR UPDATE, in one query
and in key order, the aggregates its handlers will change, and each handler
gets the instance from memory instead of reading and locking it again (two
round trips per event). Within a unit of work an aggregate is read at most
once: the instance handed out carries every change the batch made, because
every write of it goes through that instance (`EventSourcedModel.save()`
keeps the saved instance, new rows included). Outside one, the same calls
lock and read at once. Neither these instances nor the deferred writes are
undone by a rolled-back savepoint: a failed step must fail the whole unit
(as a handler's failure does), never be caught and gone on from.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import operator
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import orjson
from django.core.exceptions import ValidationError
from django.db import connection, models
from django.db.models.base import ModelState
from django.db.models.signals import post_init, pre_init


@dataclasses.dataclass
class UnitOfWork:
    lock: bool
    # (model label, key) -> the row, or None when it does not exist (yet).
    rows: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)
    dirty: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)
    # (model label, primary key) -> the aggregate locked FOR UPDATE in this
    # transaction, or None when it does not exist (yet).
    aggregates: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)
    # key -> an accumulated write (see `deferred`), run with the rows' writes.
    deferred: dict[str, Any] = dataclasses.field(default_factory=dict)


_current: contextvars.ContextVar[UnitOfWork | None] = contextvars.ContextVar(
    "eventing_rows", default=None
)


@contextlib.contextmanager
def unit_of_work(*, lock: bool = True) -> Iterator[UnitOfWork]:
    """Open a unit of work; the caller runs its writes (`take_dirty`) before commit.
    `lock=False` reads without FOR UPDATE (replay holds the consumers paused)."""
    uow = UnitOfWork(lock=lock)
    token = _current.set(uow)
    try:
        yield uow
    finally:
        _current.reset(token)


# Advisory locks on (label, key) pairs, in hash order: two batches wanting
# the same keys queue instead of deadlocking.
_LOCK_KEYS_SQL = (
    "SELECT pg_advisory_xact_lock(k) FROM ("
    "  SELECT DISTINCT hashtextextended(%s || ':' || key, 0) AS k"
    "  FROM unnest(%s::text[]) AS key ORDER BY 1) AS wanted"
)


class BatchedRows:
    """The rows of one read model, keyed by the field holding an aggregate id."""

    def __init__(self, model: type[models.Model], key_field: str) -> None:
        self.model = model
        self.key_field = key_field

    @property
    def label(self) -> str:
        return self.model._meta.label

    def new(self, **values: Any) -> Any:
        """`model(**values)`: a row a handler creates, unsaved (`_state.adding`).

        Django's constructor walks every field and sends pre_init/post_init;
        in a rebuild that was a sixth of the fold. When nothing listens to
        those signals for the model and `values` names concrete fields only
        (by attname), the instance is assembled directly: the same field
        values (a missing one gets its default, as the constructor does) and
        a fresh state. Anything else goes through the constructor."""
        model = self.model
        fields = _constructor_fields(model)
        # No receiver of either signal for any model (one list check each,
        # the usual case), or none for this model (asked per sender).
        if (
            (pre_init.receivers or post_init.receivers)
            and (pre_init.has_listeners(model) or post_init.has_listeners(model))
        ) or not values.keys() <= fields.keys():
            return model(**values)
        obj = model.__new__(model)
        if len(values) < len(fields):
            values = {a: values[a] if a in values else f.get_default() for a, f in fields.items()}
        obj.__dict__ = {"_state": ModelState(), **values}
        return obj

    def prefetch(self, keys: Iterable[str]) -> None:
        """Load the rows of `keys` not loaded yet into the current unit of work."""
        uow = _current.get()
        if uow is None:
            return
        wanted = {str(k) for k in keys} - {k for label, k in uow.rows if label == self.label}
        if not wanted:
            return
        for key in wanted:
            uow.rows[(self.label, key)] = None
        keys = sorted(wanted)
        if uow.lock:
            # The keys' locks, then the rows, in one round trip: two
            # statements, so the SELECT's snapshot is taken once the locks
            # are held and sees what their previous holders committed.
            sql, params = f"{_LOCK_KEYS_SQL};\n{self._select_sql()}", [self.label, keys, keys]
        else:
            sql, params = self._select_sql(), [keys]
        for row in self.model._default_manager.raw(sql, params):
            uow.rows[(self.label, str(getattr(row, self.key_field)))] = row

    def _select_sql(self) -> str:
        # `= ANY(array)`: one parameter, where `__in` would prepare each key.
        meta = self.model._meta
        key = meta.get_field(self.key_field)
        quote = connection.ops.quote_name
        return (
            f"SELECT * FROM {quote(meta.db_table)} "  # noqa: S608 - identifiers from metadata
            f"WHERE {quote(key.column)} = ANY(%s::{key.db_type(connection)}[])"
        )

    def lock_keys(self, keys: Iterable[str]) -> None:
        """Lock the keys, whether their rows exist or not, until the
        transaction ends: a row lock cannot cover a row not inserted yet, and
        two batches creating the same row would each write their own version.
        In hash order, so two batches wanting the same keys queue, not deadlock."""
        with connection.cursor() as cursor:
            cursor.execute(_LOCK_KEYS_SQL, [self.label, sorted(keys)])

    def get(self, key: Any) -> Any | None:
        uow = _current.get()
        if uow is None:
            self.lock_keys([str(key)])
            return self.model._default_manager.filter(**{self.key_field: key}).first()
        slot = (self.label, str(key))
        if slot not in uow.rows:
            self.prefetch([str(key)])
        return uow.rows[slot]

    def put(self, row: Any) -> None:
        uow = _current.get()
        if uow is None:
            row.save()
            return
        slot = (self.label, str(getattr(row, self.key_field)))
        uow.rows[slot] = row
        uow.dirty[slot] = row


@functools.cache
def _constructor_fields(model: type[models.Model]) -> dict[str, models.Field]:
    """attname -> field, for the fields Django's constructor sets (concrete,
    stored, not generated), in its order."""
    return {
        f.attname: f
        for f in model._meta.concrete_fields
        if f.column is not None and not getattr(f, "generated", False)
    }


def _aggregate_key(model: type[models.Model], pk: Any) -> str:
    # The key's canonical text: "ABC..." and "abc..." name one UUID.
    return str(model._meta.pk.to_python(pk))


def valid_keys(model: type[models.Model], values: Iterable[Any]) -> list[str]:
    """The values that are valid primary keys of `model`, as canonical text.
    A `before_batch` step locks only these and leaves the rest to their
    handler, which fails the lane with the reason."""
    keys = []
    for value in values:
        try:
            keys.append(_aggregate_key(model, value))
        except ValidationError:
            continue
    return keys


def lock_aggregates(model: type[models.Model], pks: Iterable[Any]) -> dict[str, Any]:
    """The rows of `model` with these primary keys, locked FOR UPDATE until
    the transaction ends: {canonical key: instance, or None if no such row}.

    Inside a unit of work, keys already held come from memory (with the
    batch's changes) and the rest are locked and read in one query, in key
    order, so that two batches wanting the same rows queue rather than
    deadlock; all of them are held for later calls. A key that is not valid
    for the field raises django.core.exceptions.ValidationError."""
    uow = _current.get()
    label = model._meta.label
    found: dict[str, Any] = {}
    missing = set()
    for pk in pks:
        key = _aggregate_key(model, pk)
        if uow is not None and (label, key) in uow.aggregates:
            found[key] = uow.aggregates[(label, key)]
        else:
            missing.add(key)
    if missing:
        loaded = {
            str(obj.pk): obj
            for obj in model._default_manager.select_for_update()
            .filter(pk__in=sorted(missing))
            .order_by("pk")
        }
        for key in missing:
            found[key] = loaded.get(key)
            if uow is not None:
                uow.aggregates[(label, key)] = found[key]
    return found


def lock_aggregate(model: type[models.Model], pk: Any) -> Any | None:
    """One row of `model`, locked FOR UPDATE (see `lock_aggregates`), or None."""
    return lock_aggregates(model, [pk])[_aggregate_key(model, pk)]


def hold_locked(instances: Iterable[models.Model]) -> None:
    """Keep instances the caller's transaction has just read with FOR UPDATE
    (by a query of its own) for `lock_aggregates` to hand out; a no-op
    outside a unit of work."""
    uow = _current.get()
    if uow is None:
        return
    for obj in instances:
        uow.aggregates[(obj._meta.label, str(obj.pk))] = obj


def hold_absent(model: type[models.Model], pks: Iterable[Any]) -> None:
    """Record that the caller's transaction looked these keys up under lock
    and found no row; a no-op outside a unit of work."""
    uow = _current.get()
    if uow is None:
        return
    for pk in pks:
        uow.aggregates.setdefault((model._meta.label, _aggregate_key(model, pk)), None)


def saved(instance: models.Model) -> None:
    """An aggregate was written through this instance: later lookups in the
    unit of work get it (a row inserted in the batch included)."""
    uow = _current.get()
    if uow is not None:
        uow.aggregates[(instance._meta.label, str(instance.pk))] = instance


@dataclasses.dataclass(frozen=True)
class Statement:
    sql: str
    params: list[Any]
    slots: tuple[tuple[str, str], ...]  # the (model label, key) of each row written


class DeferredWrite(Protocol):
    def statement(self) -> Statement | None:
        """The one statement that makes every write accumulated so far."""
        ...


W = TypeVar("W", bound=DeferredWrite)


def deferred(key: str, factory: Callable[[], W]) -> W | None:
    """Inside a unit of work, the accumulator `key` (made by `factory` on
    first use) of a write that runs once, with the batched rows' writes
    before the unit's commit (`take_dirty`): a handler that changes a row
    per event adds its change to it instead of writing. None outside a unit
    of work: the caller writes at once.

    Only for writes nothing in the unit reads back from the database before
    it ends (rows the unit holds locked, or additive changes), and that
    commute with any other write of those rows in the unit."""
    uow = _current.get()
    if uow is None:
        return None
    write = uow.deferred.get(key)
    if write is None:
        write = uow.deferred[key] = factory()
    return write


def take_dirty(uow: UnitOfWork, read_models: Iterable[BatchedRows]) -> list[Statement]:
    """The statements that write the changed rows as they are now (serialized
    here: later changes to the instances are not in them), then the deferred
    writes (`deferred`), and the rows marked clean. Replay runs them on
    another thread while it folds the next chunk."""
    statements = []
    for rows in read_models:
        slots = sorted(slot for slot in uow.dirty if slot[0] == rows.label)
        if not slots:
            continue
        statements.append(_upsert(rows, slots, [uow.dirty.pop(slot) for slot in slots]))
    for key in sorted(uow.deferred):
        statement = uow.deferred.pop(key).statement()
        if statement is not None:
            statements.append(statement)
    return statements


@dataclasses.dataclass(frozen=True)
class _Column:
    attname: str
    name: str
    quoted: str
    db_type: str
    # How the value becomes JSON that PostgreSQL's input function reads.
    encode: Callable[[Any], Any] | None
    # Fields whose value is computed at save time (auto_now): use pre_save.
    field: models.Field | None


@dataclasses.dataclass(frozen=True)
class _Plan:
    columns: list[_Column]
    sql: str
    # Rows go as JSON arrays in column order (else as objects keyed by column).
    positional: bool


_AUTO_FIELDS = {"AutoField", "BigAutoField", "SmallAutoField"}
_plans: dict[tuple[type[models.Model], str], _Plan] = {}


def _encoder_for(field: models.Field) -> Callable[[Any], Any] | None:
    """None when `_dumps` already writes the value as PostgreSQL reads it:
    datetimes, dates, times and Decimals go out as str() (an ISO 8601 text
    with a space for the "T", which timestamptz reads alike), UUIDs in their
    canonical form. Encoding them here in Python cost a tenth of a rebuild."""
    if isinstance(field, models.JSONField):
        if field.encoder is None:
            return None  # already JSON-shaped
        encoder = field.encoder
        return lambda value: json.loads(json.dumps(value, cls=encoder))
    return None


# What json.dumps(..., default=str) did, where orjson differs: datetimes
# and dataclasses go to `default` (str) instead of orjson's own encoding.
_ORJSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _dumps(records: list[Any]) -> str:
    """The chunk's rows as one JSON document: orjson, in a fifth of
    json.dumps' time, with json.dumps for what orjson refuses (integers
    beyond 64 bits). Values neither encodes (Decimal) go out as str. One
    difference is left: a NaN becomes null, which PostgreSQL would have
    refused."""
    try:
        return orjson.dumps(records, default=str, option=_ORJSON_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(records, default=str)


def _plan(rows: BatchedRows) -> _Plan:
    """The columns written and the statement text, once per model."""
    model = rows.model
    if (model, rows.key_field) in _plans:
        return _plans[(model, rows.key_field)]
    quote = connection.ops.quote_name
    fields = [
        f
        for f in model._meta.concrete_fields
        if f.name == rows.key_field or f.get_internal_type() not in _AUTO_FIELDS
    ]
    columns = [
        _Column(
            attname=f.attname,
            name=f.column,
            quoted=quote(f.column),
            db_type=f.db_type(connection),
            encode=_encoder_for(f),
            field=f if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False) else None,
        )
        for f in fields
    ]
    names = ", ".join(c.quoted for c in columns)
    key = quote(model._meta.get_field(rows.key_field).column)
    updates = ", ".join(f"{c.quoted} = EXCLUDED.{c.quoted}" for c in columns if c.quoted != key)
    table = quote(model._meta.db_table)
    elements = [_element(i, c.db_type) for i, c in enumerate(columns)]
    positional = all(element is not None for element in elements)
    # Identifiers only, from the model's metadata and quoted; values are parameters.
    if positional:
        selected = ", ".join(map(str, elements))
        source = f"SELECT {selected} FROM jsonb_array_elements(%s::jsonb) AS e"  # noqa: S608
    else:
        shape = ", ".join(f"{c.quoted} {c.db_type}" for c in columns)
        source = f"SELECT {names} FROM jsonb_to_recordset(%s::jsonb) AS r({shape})"  # noqa: S608
    sql = f"INSERT INTO {table} ({names}) {source} ON CONFLICT ({key}) DO UPDATE SET {updates}"
    _plans[(model, rows.key_field)] = plan = _Plan(columns, sql, positional)
    return plan


# Types whose text form the row's JSON carries (`_dumps`: str() of
# datetimes, Decimals, UUIDs...), read by their input function as
# jsonb_to_recordset would. Without their typmod: the INSERT's assignment
# applies it (a varchar(12) too long still fails, a numeric is still
# rounded), where an explicit cast to varchar(12) would truncate silently.
_TEXT_INPUT_TYPES = frozenset(
    {
        "smallint",
        "integer",
        "bigint",
        "real",
        "double precision",
        "numeric",
        "boolean",
        "varchar",
        "text",
        "uuid",
        "date",
        "time",
        "timestamp",
        "timestamp with time zone",
        "interval",
        "inet",
    }
)


def _element(index: int, db_type: str) -> str | None:
    """The expression reading column `index` of a row sent as a JSON array
    (`e`), or None when only jsonb_to_recordset reads the type (arrays,
    composite and other types): the plan then sends objects."""
    base = re.sub(r"\(.*?\)", "", db_type).strip().lower()
    if base in ("json", "jsonb"):
        # A JSON null is SQL NULL, as jsonb_to_recordset gives it.
        return f"NULLIF(e->{index}, 'null'::jsonb)::{base}"
    if base in _TEXT_INPUT_TYPES:
        return f"(e->>{index})::{base}"
    return None


def _upsert(rows: BatchedRows, slots: list[tuple[str, str]], instances: list[Any]) -> Statement:
    """INSERT ... SELECT FROM jsonb_array_elements(one JSON document) ON CONFLICT
    (key) DO UPDATE: one statement with a fixed text and one parameter. JSON is
    the cheapest way here to ship thousands of rows (one C-level dump, one
    parse on the server, JSON columns passed through as they are), where
    `bulk_create(update_conflicts=True)` or per-column arrays spend most of a
    replay adapting values one by one. Each row is an array in column order:
    against objects read by jsonb_to_recordset, a quarter less server time
    per row (no keys to parse and look up) and a smaller dump. A surrogate
    auto primary key is left to its sequence (or kept on update)."""
    plan = _plan(rows)
    columns = plan.columns
    if all(column.encode is None and column.field is None for column in columns):
        # Every value as the instance holds it: the records are built in C.
        values = operator.attrgetter(*(column.attname for column in columns))
        if len(columns) == 1:
            records: list[Any] = [(values(obj),) for obj in instances]
        else:
            records = [values(obj) for obj in instances]
    else:
        records = []
        for obj in instances:
            record = []
            for column in columns:
                value = (
                    column.field.pre_save(obj, True)
                    if column.field is not None
                    else getattr(obj, column.attname)
                )
                if value is not None and column.encode is not None:
                    value = column.encode(value)
                record.append(value)
            records.append(record)
    if not plan.positional:
        names = [column.name for column in columns]
        records = [dict(zip(names, record, strict=True)) for record in records]
    return Statement(plan.sql, [_dumps(records)], tuple(slots))
