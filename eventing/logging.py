"""Logs that say which event they are about.

While a consumer handles an event, a context variable holds the event's id,
type, correlation id and the consumer's name; `EventContextFilter` copies them
onto every log record that passes a handler, so every line written meanwhile
(by the runtime, a handler, Django, a library) carries them. The consumer
runtime sets it per applied event; the Celery task hooks set it for the whole
task, so the retry and dead-letter lines carry them too.

`LOG_FORMAT=json` writes one JSON object a line (`JsonFormatter`); the default
plain format appends the same fields in brackets when there are any.
`settings.LOGGING` uses these for Django's processes; `configure_celery_logger`
applies them to the handlers Celery's worker installs for itself (it replaces
the root logger's handlers with its own).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

FIELDS = ("event_id", "event_type", "correlation_id", "consumer")

_handling: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "eventing_log_context", default=None
)


def current() -> dict[str, str] | None:
    return _handling.get()


def bind(
    *, event_id: str, event_type: str, correlation_id: str, consumer: str
) -> contextvars.Token[dict[str, str] | None]:
    """Set the event of the lines that follow; pass the token to `unbind`."""
    return _handling.set(
        {
            "event_id": event_id,
            "event_type": event_type,
            "correlation_id": correlation_id,
            "consumer": consumer,
        }
    )


def unbind(token: contextvars.Token[dict[str, str] | None]) -> None:
    try:
        _handling.reset(token)
    except ValueError:
        # Set in another context (a signal handler that ran elsewhere): clear.
        _handling.set(None)


@contextlib.contextmanager
def handling(
    *, event_id: str, event_type: str, correlation_id: str, consumer: str
) -> Iterator[None]:
    token = bind(
        event_id=event_id, event_type=event_type, correlation_id=correlation_id, consumer=consumer
    )
    try:
        yield
    finally:
        unbind(token)


class EventContextFilter(logging.Filter):
    """Adds the handled event's fields to each record (empty strings outside
    of one, so a format string may name them unconditionally)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _handling.get()
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, fields[name] if fields else "")
        return True


def _event_fields(record: logging.LogRecord) -> dict[str, str]:
    fields = _handling.get() or {}
    values = {name: getattr(record, name, "") or fields.get(name, "") for name in FIELDS}
    return {name: value for name, value in values.items() if value}


def _trace_fields() -> dict[str, str]:
    from . import tracing

    if not tracing.ACTIVE:
        return {}
    from opentelemetry import trace

    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {"trace_id": f"{span_context.trace_id:032x}", "span_id": f"{span_context.span_id:016x}"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, the
    handled event's fields, the active trace, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        line.update(_event_fields(record))
        line.update(_trace_fields())
        # Celery's task loggers put these on the record.
        for name in ("task_name", "task_id"):
            value = getattr(record, name, None)
            if value and value != "???":
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def _suffix(record: logging.LogRecord) -> str:
    fields = _event_fields(record)
    if not fields:
        return ""
    return " [" + " ".join(f"{name}={value}" for name, value in fields.items()) + "]"


class PlainFormatter(logging.Formatter):
    """The plain format, with `[event_id=... event_type=... ...]` appended to
    the first line of a record written while an event is handled."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        suffix = _suffix(record)
        if not suffix:
            return text
        first, newline, rest = text.partition("\n")
        return first + suffix + newline + rest


class _SuffixingFormatter(logging.Formatter):
    """Wraps a formatter someone else chose (Celery's colour formatter)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        suffix = _suffix(record)
        if not suffix:
            return text
        first, newline, rest = text.partition("\n")
        return first + suffix + newline + rest


def log_format() -> str:
    value = os.environ.get("LOG_FORMAT", "plain").strip().lower()
    return "json" if value == "json" else "plain"


def configure_celery_logger(logger: logging.Logger, **_: Any) -> None:
    """`after_setup_logger` / `after_setup_task_logger`: Celery replaced the
    root handlers with its own; give them the event fields and the format."""
    for handler in logger.handlers:
        if not any(isinstance(f, EventContextFilter) for f in handler.filters):
            handler.addFilter(EventContextFilter())
        current_formatter = handler.formatter
        if log_format() == "json":
            if not isinstance(current_formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
        elif current_formatter is not None and not isinstance(
            current_formatter, _SuffixingFormatter | PlainFormatter
        ):
            handler.setFormatter(_SuffixingFormatter(current_formatter))
