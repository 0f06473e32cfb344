"""REST endpoints for orders. Thin: input validation here, writes in services,
reads in selectors (from the `OrderSummary` read model)."""

from __future__ import annotations

import re
import uuid
from typing import Any, ClassVar

from django.db.models import QuerySet
from django.http import Http404
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from config.api import Conflict, IsStaff, error_responses, location_header
from eventing.api import (
    CONSISTENCY_PARAMETERS,
    ReadYourWritesMixin,
    command_token_header,
    with_consistency_token,
)

from . import selectors, services
from .models import InvalidTransition, Order, OrderSummary
from .serializers import (
    OrderCancelSerializer,
    OrderDetailSerializer,
    OrderListFilterSerializer,
    OrderListItemSerializer,
    OrderPlaceSerializer,
    OrderSerializer,
)

_LINE_ERROR_KEY = re.compile(r"^lines\[(\d+)\]\.(\w+)$")


def _field_errors(errors: dict[str, list[str]]) -> dict[str, Any]:
    """The service names fields as "lines[2].sku"; answer in DRF's nested
    shape ({"lines": {2: {"sku": [...]}}}) like the serializer's own errors."""
    shaped: dict[str, Any] = {}
    for key, messages in errors.items():
        match = _LINE_ERROR_KEY.match(key)
        if key == "lines":  # about the list itself, as DRF puts max_length errors
            shaped.setdefault("lines", {}).setdefault("non_field_errors", []).extend(messages)
        elif match is not None:
            line = shaped.setdefault("lines", {}).setdefault(int(match[1]), {})
            line.setdefault(match[2], []).extend(messages)
        else:
            shaped.setdefault(key, []).extend(messages)
    return shaped


class OrderViewSet(ReadYourWritesMixin, viewsets.GenericViewSet):
    """Orders. Commands answer from the write model with a consistency token;
    queries answer from the read model and wait for a token when given one."""

    consistency_consumer = selectors.SUMMARY_CONSUMER
    serializer_class = OrderDetailSerializer
    queryset = Order.objects.none()  # schema introspection only (path parameter type)

    # For the browsable API's forms; the actions name their serializers.
    action_serializers: ClassVar[dict[str, type[serializers.Serializer]]] = {
        "list": OrderListItemSerializer,
        "create": OrderPlaceSerializer,
        "cancel": OrderCancelSerializer,
        "ship": serializers.Serializer,
    }

    def get_serializer_class(self) -> type[serializers.Serializer]:
        return self.action_serializers.get(self.action or "", OrderDetailSerializer)

    def get_permissions(self) -> list[Any]:
        if self.action == "ship":
            return [IsStaff()]
        return super().get_permissions()

    def _order(self) -> Order:
        try:
            order_id = uuid.UUID(self.kwargs["pk"])
        except ValueError:
            raise Http404 from None
        order = selectors.order_get_for(user=self.request.user, order_id=order_id)
        if order is None:
            raise Http404
        return order

    def _command_response(self, order: Order, code: int = status.HTTP_200_OK) -> Response:
        response = Response(OrderSerializer(order).data, status=code)
        return with_consistency_token(response, order)

    def get_queryset(self) -> QuerySet[OrderSummary]:
        filters = OrderListFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        return selectors.order_summaries_for(
            user=self.request.user, status=filters.validated_data.get("status")
        )

    @extend_schema(
        parameters=[OrderListFilterSerializer, *CONSISTENCY_PARAMETERS],
        responses={200: OrderListItemSerializer(many=True), **error_responses(400, 401, 404)},
        description="The caller's orders (staff: all), newest first, from the read model: "
        "an order appears once its summary is built; pass the placing command's "
        "consistency token to wait for it.",
    )
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(OrderListItemSerializer(page, many=True).data)

    @extend_schema(
        parameters=CONSISTENCY_PARAMETERS,
        responses={200: OrderDetailSerializer, **error_responses(400, 401, 404)},
        description="Status, lines, total and timeline from the read model. Until the "
        "read model has the order, status/lines/total come from the write model with "
        "an empty timeline and `consistency: catching-up`.",
    )
    def retrieve(self, request: Request, pk: str) -> Response:
        view = selectors.order_view(order=self._order())
        return Response(OrderDetailSerializer(view).data)

    @extend_schema(
        request=OrderPlaceSerializer,
        responses={201: OrderSerializer, **error_responses(400, 401)},
        parameters=[location_header(), command_token_header(201)],
        description="Place an order: answers at once with status PENDING, a Location and a "
        "consistency token; inventory's answer (CONFIRMED or REJECTED) follows.",
    )
    def create(self, request: Request) -> Response:
        incoming = OrderPlaceSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        try:
            order = services.order_place(
                customer_id=request.user.pk, lines=incoming.validated_data["lines"]
            )
        except services.OrderValidationError as exc:
            raise serializers.ValidationError(_field_errors(exc.errors)) from exc
        response = self._command_response(order, status.HTTP_201_CREATED)
        response["Location"] = reverse("order-detail", kwargs={"pk": str(order.pk)})
        return response

    @extend_schema(
        request=OrderCancelSerializer,
        responses={200: OrderSerializer, **error_responses(400, 401, 404, 409)},
        parameters=[command_token_header(200)],
        description="Cancel a PENDING or CONFIRMED order (owner or staff). Inventory "
        "releases the stock afterwards; pass the token to an inventory query to wait.",
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        order = self._order()
        incoming = OrderCancelSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        try:
            order = services.order_cancel(
                order_id=str(order.pk), reason=incoming.validated_data["reason"]
            )
        except InvalidTransition as exc:
            raise Conflict(str(exc)) from exc
        return self._command_response(order)

    @extend_schema(
        request=None,
        responses={200: OrderSerializer, **error_responses(401, 403, 404, 409)},
        parameters=[command_token_header(200)],
        description="Ship a CONFIRMED order (staff only); inventory then commits the stock.",
    )
    @action(detail=True, methods=["post"])
    def ship(self, request: Request, pk: str) -> Response:
        order = self._order()
        try:
            order = services.order_ship(order_id=str(order.pk))
        except InvalidTransition as exc:
            raise Conflict(str(exc)) from exc
        return self._command_response(order)
