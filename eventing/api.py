"""REST for the platform: read-your-writes consistency tokens (used by every
business app's API), the event store browser and the ops status (staff only).

Knows no business app. The status comes from `eventing.selectors`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, ClassVar

from django.conf import settings
from django.db.models import Max, QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, serializers, viewsets
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import SAFE_METHODS, IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .consumers import registry as consumer_registry
from .events import registry as event_registry
from .models import Checkpoint, EventSourcedModel, StoredEvent
from .selectors import eventing_status, events_filtered
from .serializers import EventFilterSerializer, EventingStatusSerializer, StoredEventSerializer

# -- read your writes ------------------------------------------------------------
#
# A command's response names the stream and version it produced:
# "<aggregate_type>:<aggregate_id>:<version>", e.g. "orders.Order:<uuid>:3".
# A query served from consumer C's projection is consistent with the token once
# C's checkpoint on that stream reached the last version <= token.version that C
# subscribes to: C's projection changes only on events it handles, so waiting
# for one it does not handle would wait for nothing (and time out). A query
# served from the write model of the token's own stream is consistent at once,
# since the command committed before it answered (views declare those in
# `consistency_write_models`).

CONSISTENCY_HEADER = "X-Consistency-Token"
CONSISTENCY_STATE_HEADER = "X-Consistency"
CONSISTENCY_PARAM = "consistency_token"
CURRENT = "current"
CATCHING_UP = "catching-up"

_TOKEN = re.compile(
    r"^(?P<aggregate_type>[A-Za-z][A-Za-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*)"
    r":(?P<aggregate_id>[A-Za-z0-9._-]{1,100})"
    r":(?P<version>[1-9][0-9]{0,9})$"
)


class InvalidConsistencyToken(ValueError):
    """The client sent a token this server never issued (HTTP 400)."""


@dataclasses.dataclass(frozen=True)
class ConsistencyToken:
    aggregate_type: str
    aggregate_id: str
    version: int

    def __str__(self) -> str:
        return f"{self.aggregate_type}:{self.aggregate_id}:{self.version}"

    @classmethod
    def for_aggregate(cls, aggregate: EventSourcedModel) -> ConsistencyToken:
        """The token of the aggregate's latest committed write (call after save)."""
        return cls(aggregate.aggregate_type, aggregate.aggregate_id, aggregate.version)

    @classmethod
    def parse(cls, raw: str) -> ConsistencyToken:
        match = _TOKEN.match(raw.strip())
        if match is None:
            raise InvalidConsistencyToken(
                "malformed consistency token: expected '<aggregate_type>:<aggregate_id>:<version>' "
                "as returned by a command"
            )
        aggregate_type = match["aggregate_type"]
        if aggregate_type not in known_aggregate_types():
            raise InvalidConsistencyToken(f"unknown aggregate type {aggregate_type!r}")
        return cls(aggregate_type, match["aggregate_id"], int(match["version"]))


def known_aggregate_types() -> set[str]:
    return {cls.aggregate_type for cls in event_registry.all().values()}


def consistency_settings() -> tuple[float, float]:
    """(timeout, poll interval) in seconds. A waiting query holds a web worker,
    so the bound stays small; EVENTING CONSISTENCY_WAIT_SECONDS / _POLL_SECONDS."""
    conf = getattr(settings, "EVENTING", {})
    return (
        float(conf.get("CONSISTENCY_WAIT_SECONDS", 5.0)),
        float(conf.get("CONSISTENCY_POLL_SECONDS", 0.02)),
    )


def version_to_await(token: ConsistencyToken, consumer: str) -> int:
    """The stream version `consumer` must have applied to reflect `token`;
    0 when none of the stream's events up to the token concern it."""
    handled = list(consumer_registry.get(consumer).handlers)
    found = StoredEvent.objects.filter(
        aggregate_type=token.aggregate_type,
        aggregate_id=token.aggregate_id,
        version__lte=token.version,
        event_type__in=handled,
    ).aggregate(top=Max("version"))["top"]
    return found or 0


def wait_until_applied(
    token: ConsistencyToken,
    *,
    consumer: str,
    timeout: float | None = None,
    interval: float | None = None,
) -> bool:
    """Poll the consumer's checkpoint until it reflects `token` or the deadline
    passes; return whether it does. Call it outside `transaction.atomic()`: a
    transaction held across the sleeps would hold its locks that long (and
    under REPEATABLE READ would never see the worker's commit)."""
    default_timeout, default_interval = consistency_settings()
    timeout = default_timeout if timeout is None else timeout
    interval = default_interval if interval is None else interval
    target = version_to_await(token, consumer)
    if target == 0:
        return True
    lane = Checkpoint.objects.filter(
        consumer=consumer,
        aggregate_type=token.aggregate_type,
        aggregate_id=token.aggregate_id,
        version__gte=target,
    )
    deadline = time.monotonic() + timeout
    while True:
        if lane.exists():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval, remaining))


@dataclasses.dataclass(frozen=True)
class Consistency:
    """What a query knows about the token it was given (None: no token)."""

    token: ConsistencyToken | None
    applied: bool

    @property
    def state(self) -> str:
        return CURRENT if self.applied else CATCHING_UP


CONSISTENCY_PARAMETERS = [
    OpenApiParameter(
        CONSISTENCY_PARAM,
        OpenApiTypes.STR,
        OpenApiParameter.QUERY,
        description=(
            "A consistency token from a command's response. The query waits (bounded, "
            "5 s by default) until this read model reflects that command, then answers. "
            f"If it still does not, the answer is the current data with header "
            f"`{CONSISTENCY_STATE_HEADER}: {CATCHING_UP}`. Malformed tokens get 400."
        ),
    ),
    OpenApiParameter(
        CONSISTENCY_HEADER,
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        description=f"Same as the `{CONSISTENCY_PARAM}` query parameter (which wins if both).",
    ),
    OpenApiParameter(
        CONSISTENCY_STATE_HEADER,
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        enum=[CURRENT, CATCHING_UP],
        response=[200],
        description="Present when a consistency token was given: whether the answer "
        "reflects it (`current`) or the bounded wait ran out (`catching-up`).",
    ),
]


def command_token_header(*codes: int) -> OpenApiParameter:
    """Schema of the response header carrying a command's consistency token."""
    return OpenApiParameter(
        CONSISTENCY_HEADER,
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        response=list(codes),
        description="This command's consistency token (also the body's `consistency_token`): "
        f"pass it to a query as `{CONSISTENCY_PARAM}` or `{CONSISTENCY_HEADER}` to read "
        "your write.",
    )


class ReadYourWritesMixin:
    """For views served from `consistency_consumer`'s projection: a safe request
    carrying a token waits until that consumer reflects it, after
    authentication and permission checks (an anonymous caller cannot make the
    server wait). The outcome is in `self.consistency` and the
    `X-Consistency` response header."""

    consistency_consumer: ClassVar[str] = ""
    # Aggregate types the view answers from their write model: a token naming
    # one is reflected already (the command committed before it answered).
    consistency_write_models: ClassVar[tuple[str, ...]] = ()
    consistency: Consistency | None = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        self.consistency = None
        if request.method in SAFE_METHODS:
            self.consistency = self.await_consistency(request)

    def await_consistency(self, request: Request) -> Consistency:
        raw = request.query_params.get(CONSISTENCY_PARAM) or request.headers.get(
            CONSISTENCY_HEADER, ""
        )
        if not raw:
            return Consistency(token=None, applied=True)
        try:
            token = ConsistencyToken.parse(raw)
        except InvalidConsistencyToken as exc:
            raise serializers.ValidationError({CONSISTENCY_PARAM: [str(exc)]}) from exc
        if token.aggregate_type in self.consistency_write_models:
            return Consistency(token=token, applied=True)
        applied = wait_until_applied(token, consumer=self.consistency_consumer)
        return Consistency(token=token, applied=applied)

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        if self.consistency is not None and self.consistency.token is not None:
            response[CONSISTENCY_STATE_HEADER] = self.consistency.state
        return response


def with_consistency_token(response: Response, aggregate: EventSourcedModel) -> Response:
    """Put a command's token in the header; the body carries it as a field."""
    response[CONSISTENCY_HEADER] = str(ConsistencyToken.for_aggregate(aggregate))
    return response


# -- event store browser -----------------------------------------------------------


class EventPagination(CursorPagination):
    # Cursor, not page numbers: no COUNT(*) over a store that only grows, and
    # pages do not shift while events are appended at the end.
    ordering = "position"
    page_size_query_param = "page_size"
    max_page_size = 500


def _errors(*documented: tuple[int, str]) -> dict[int, OpenApiResponse]:
    """Error answers in DRF's shape; 401 is on every endpoint here."""
    answers = [(401, "Not authenticated."), *documented]
    return {
        code: OpenApiResponse(
            response=OpenApiTypes.OBJECT if code == 400 else ErrorDetailSerializer,
            description=text,
        )
        for code, text in answers
    }


class ErrorDetailSerializer(serializers.Serializer):
    detail = serializers.CharField()


class EventViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """The event store, oldest first (global position order), as CloudEvents
    envelopes: exactly what consumers receive on the wire."""

    permission_classes = [IsAdminUser]
    serializer_class = StoredEventSerializer
    pagination_class = EventPagination
    queryset = StoredEvent.objects.none()  # schema introspection; see get_queryset

    def get_queryset(self) -> QuerySet[StoredEvent]:
        filters = EventFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        data = filters.validated_data
        return events_filtered(
            aggregate_id=data.get("aggregate_id", ""),
            aggregate_type=data.get("aggregate_type", ""),
            event_type=data.get("type", ""),
            correlation_id=data.get("correlation_id", ""),
            after=data.get("after"),
        )

    @extend_schema(
        parameters=[EventFilterSerializer],
        responses={
            200: StoredEventSerializer(many=True),
            **_errors(
                (400, "Invalid filter or page size."),
                (403, "Staff only."),
                (404, "Invalid cursor."),
            ),
        },
    )
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)


# -- ops status --------------------------------------------------------------------


class EventingStatusView(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(responses={200: EventingStatusSerializer, **_errors((403, "Staff only."))})
    def get(self, request: Request) -> Response:
        return Response(EventingStatusSerializer(eventing_status(parked_limit=50)).data)
