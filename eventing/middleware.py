"""Per-request event metadata: correlation id, actor and trace context."""

from __future__ import annotations

import re
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from . import context

_CORRELATION = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class EventContextMiddleware:
    """Events appended while serving a request carry its correlation id (the
    client's `X-Correlation-ID` when well-formed), its user and `traceparent`."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        supplied = request.headers.get("X-Correlation-ID", "")
        correlation_id = supplied if _CORRELATION.match(supplied) else context.new_correlation_id()
        traceparent = request.headers.get("traceparent", "")
        user = getattr(request, "user", None)
        actor = f"user:{user.pk}" if user is not None and user.is_authenticated else "anonymous"
        with context.scope(
            correlation_id=correlation_id,
            causation_id=None,
            actor=actor,
            traceparent=traceparent if _TRACEPARENT.match(traceparent) else "",
            chain_depth=0,
        ):
            response = self.get_response(request)
        response["X-Correlation-ID"] = correlation_id
        return response
