"""OpenTelemetry tracing: setup from the standard `OTEL_*` variables, and the
spans that carry one trace from an HTTP request through the store, the relay,
each consumer and the events those consumers emit.

The W3C `traceparent` travels in the event envelope (`StoredEvent.traceparent`):
the store records the context of the span that appended the event, the relay
starts a publish span under it (and puts that span's context in the Celery
message headers), and the consumer runtime applies each event in a span whose
parent is the event's recorded context. Events a handler emits are appended
under that span, so they continue the same trace.

Off unless the environment names an exporter: `OTEL_TRACES_EXPORTER` (`otlp`,
`console`, comma-separated; `none` disables) or an OTLP endpoint
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). With none
of them set no SDK is installed, the API stays a no-op, and every helper here
returns after one boolean check. (The OpenTelemetry spec defaults the exporter
to `otlp`; we default to nothing so that a laptop without a collector pays
nothing.) The OTLP exporter shipped is HTTP/protobuf; the SDK reads the rest
(`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
`OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`, ...) itself.

`EVENTING_TEST_SPAN_FILE` (test-only, off by default) also turns tracing on and
appends every finished span to that file as one JSON line, so a test can read
the spans of worker processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

logger = logging.getLogger(__name__)

TEST_SPAN_FILE_ENV = "EVENTING_TEST_SPAN_FILE"
# Health probes and scrapes would be most of the spans and say nothing.
DEFAULT_EXCLUDED_URLS = "healthz,readyz,metrics"
TRACER_NAME = "eventing"
# The SDK keeps at most 128 links per span by default (OTEL_SPAN_LINK_COUNT_LIMIT).
MAX_BATCH_LINKS = 128

# True once a tracer provider is installed in this process. Every hook checks it
# first: with tracing off they cost one global lookup.
ACTIVE = False
_tracer: trace.Tracer | None = None
_provider: Any = None
_instrumented: list[Any] = []


# -- setup ---------------------------------------------------------------------------


def exporters_from_env(environ: Mapping[str, str] = os.environ) -> list[Any]:
    """The span exporters the standard variables ask for (possibly none)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        if not endpoint:
            return []
        names = "otlp"
    exporters = []
    for raw in names.split(","):
        name = raw.strip().lower()
        if not name or name == "none":
            continue
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            )
            name = "otlp_proto_grpc" if protocol.strip() == "grpc" else "otlp_proto_http"
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER names {name!r}, which no installed package provides "
                "(installed: otlp over http/protobuf, console)"
            )
        exporters.append(next(iter(found)).load()())
    return exporters


def setup(role: str) -> bool:
    """Install the SDK in this process if the environment asks for it.

    Call once per process after fork (gunicorn worker, Celery pool child).
    Returns whether tracing is on.
    """
    if ACTIVE:
        return True
    try:
        exporters = exporters_from_env()
    except Exception:
        logger.exception("tracing disabled: the OTEL_* exporter settings are not usable")
        return False
    span_file = os.environ.get(TEST_SPAN_FILE_ENV, "")
    if not exporters and not span_file:
        return False
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=resource(role))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if span_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(span_file)))
    trace.set_tracer_provider(provider)
    install(provider, django=role == "web")
    return True


def resource(role: str) -> Any:
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, Any] = {"eventflow.role": role}
    # The environment's service name wins over ours.
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = f"eventflow-{role}"
    return Resource.create(attributes)


def install(provider: Any, *, django: bool = True, celery: bool = True) -> None:
    """Use `provider` for the platform's spans and instrument Django and Celery.

    The Django middleware is added to `settings.MIDDLEWARE`, so this must run
    before the WSGI handler (or a test client) loads the middleware.
    """
    global ACTIVE, _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer(TRACER_NAME)
    if django:
        from opentelemetry.instrumentation.django import DjangoInstrumentor

        instrumentor: Any = DjangoInstrumentor()
        excluded = os.environ.get("OTEL_PYTHON_DJANGO_EXCLUDED_URLS") or DEFAULT_EXCLUDED_URLS
        instrumentor.instrument(tracer_provider=provider, excluded_urls=excluded)
        _instrumented.append(instrumentor)
    if celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        instrumentor = CeleryInstrumentor()
        instrumentor.instrument(tracer_provider=provider)
        _instrumented.append(instrumentor)
    ACTIVE = True


def uninstall() -> None:
    """Undo `install` (tests): hooks go back to no-ops."""
    global ACTIVE, _tracer
    ACTIVE = False
    while _instrumented:
        _instrumented.pop().uninstrument()
    _tracer = None


def flush(timeout_millis: int = 5000) -> None:
    """Export what is buffered (a pool child about to exit)."""
    if _provider is not None:
        with contextlib.suppress(Exception):
            _provider.force_flush(timeout_millis)


def tracer() -> trace.Tracer:
    return _tracer or trace.get_tracer(TRACER_NAME)


# -- W3C trace context ---------------------------------------------------------------


def format_traceparent(span_context: SpanContext) -> str:
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{int(span_context.trace_flags):02x}"
    )


def parse_traceparent(value: str) -> SpanContext | None:
    """The span context a stored `traceparent` names; None if empty or invalid."""
    if not value or len(value) != 55:
        return None
    try:
        version, trace_id, span_id, flags = value.split("-")
        context = SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(int(flags, 16)),
        )
    except ValueError:
        return None
    return context if version != "ff" and context.is_valid else None


def current_traceparent() -> str:
    """The active span's `traceparent`, or "" when no span is active."""
    span_context = trace.get_current_span().get_span_context()
    return format_traceparent(span_context) if span_context.is_valid else ""


def _context_of(span_context: SpanContext) -> Context:
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


# -- spans of the platform -----------------------------------------------------------


@contextlib.contextmanager
def append_span(
    *, aggregate_type: str, aggregate_id: str, event_types: Sequence[str], fallback_parent: str
) -> Iterator[str]:
    """A span for one `store.append`; yields its `traceparent` for the events.

    Its parent is the active span (an HTTP request, a consumer applying an
    event) or else `fallback_parent`, the `traceparent` the caller was given
    (say, by a client whose request was not traced here).
    """
    parent: Context | None = None
    if not trace.get_current_span().get_span_context().is_valid:
        remote = parse_traceparent(fallback_parent)
        if remote is not None:
            parent = _context_of(remote)
    with tracer().start_as_current_span(
        f"eventing append {aggregate_type}",
        context=parent,
        attributes={
            "eventing.aggregate_type": aggregate_type,
            "eventing.aggregate_id": aggregate_id,
            "eventing.event_types": list(event_types),
            "eventing.event_count": len(event_types),
        },
    ) as span:
        yield format_traceparent(span.get_span_context())


@contextlib.contextmanager
def apply_span(consumer: str, row: Any) -> Iterator[None]:
    """A span for one consumer applying one stored event.

    Parent: the event's recorded context. When the active span (Celery's task
    span, under the relay's publish span) is already in that trace, nest under
    it instead, which keeps the tree readable; an event caught up from the
    store belongs to another trace, so it gets its own parent and a link to
    the task that applied it.
    """
    stored = parse_traceparent(row.traceparent)
    active = trace.get_current_span().get_span_context()
    parent: Context | None = None
    links: list[Link] = []
    if stored is not None and not (active.is_valid and active.trace_id == stored.trace_id):
        parent = _context_of(stored)
        if active.is_valid:
            links.append(Link(active))
    with tracer().start_as_current_span(
        f"eventing apply {row.event_type}",
        context=parent,
        links=links,
        kind=SpanKind.CONSUMER,
        attributes={
            "eventing.consumer": consumer,
            "eventing.event_id": str(row.event_id),
            "eventing.event_type": row.event_type,
            "eventing.aggregate_type": row.aggregate_type,
            "eventing.aggregate_id": row.aggregate_id,
            "eventing.aggregate_version": row.version,
            "eventing.position": row.position,
            "eventing.correlation_id": row.correlation_id,
        },
    ):
        yield


@dataclasses.dataclass
class RelaySpans:
    batch: Any
    per_row: dict[Any, Any]


def relay_publishing(rows: Sequence[Any], outgoing: Sequence[Any]) -> RelaySpans:
    """Spans for one relay batch, started just before it is published.

    The batch span links to the events' contexts (a batch mixes many traces).
    Each event with a recorded context also gets a publish span inside its own
    trace; that span's `traceparent` goes into the Celery headers of the
    event's messages, so the consumer's task span continues the trace.
    """
    contexts = {
        row.outbox_id: parse_traceparent(row.envelope.get("traceparent", "")) for row in rows
    }
    links = [Link(sc) for sc in contexts.values() if sc is not None][:MAX_BATCH_LINKS]
    batch = tracer().start_span(
        "eventing relay batch",
        links=links,
        attributes={"eventing.batch_rows": len(rows), "eventing.batch_messages": len(outgoing)},
    )
    batch_link = [Link(batch.get_span_context())]
    per_row = {}
    for row in rows:
        stored = contexts[row.outbox_id]
        if stored is None:
            continue
        per_row[row.outbox_id] = tracer().start_span(
            f"eventing publish {row.envelope['type']}",
            context=_context_of(stored),
            kind=SpanKind.PRODUCER,
            links=batch_link,
            attributes={
                "messaging.system": "rabbitmq",
                "eventing.event_id": row.envelope["id"],
                "eventing.event_type": row.envelope["type"],
                "eventing.outbox_id": row.outbox_id,
                "eventing.target_consumer": row.consumer or "*",
            },
        )
    for message in outgoing:
        # A batch message continues the trace of its first traced event; the
        # consumer parents each event's apply span on its own recorded context.
        span = next((per_row[key] for key in message.keys if key in per_row), None)
        if span is not None:
            message.headers["traceparent"] = format_traceparent(span.get_span_context())
    return RelaySpans(batch, per_row)


def relay_published(spans: RelaySpans, failed: Mapping[Any, str], published: int) -> None:
    for outbox_id, span in spans.per_row.items():
        if outbox_id in failed:
            span.set_status(Status(StatusCode.ERROR, failed[outbox_id][:200]))
        span.end()
    spans.batch.set_attribute("eventing.published_rows", published)
    spans.batch.set_attribute("eventing.failed_rows", len(failed))
    if failed:
        spans.batch.set_status(Status(StatusCode.ERROR, f"{len(failed)} rows not published"))
    spans.batch.end()


# -- test-only exporter --------------------------------------------------------------


class JsonLinesSpanExporter:
    """Appends finished spans to a file, one JSON object a line (O_APPEND, one
    write per batch, so the pool children of one worker can share the file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = "".join(json.dumps(span_to_dict(span), default=str) + "\n" for span in spans)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_to_dict(span: Any) -> dict[str, Any]:
    """The fields a test (or a person with `jq`) needs of one finished SDK span."""
    ctx = span.get_span_context()
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "kind": span.kind.name,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
        "service": span.resource.attributes.get("service.name"),
        "pid": os.getpid(),
        "start_time": span.start_time,
        "end_time": span.end_time,
    }
