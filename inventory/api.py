"""REST endpoints for inventory: the catalog with stock levels (any signed-in
user reads it, to know what to order), item creation and stock receipt (staff)."""

from __future__ import annotations

from decimal import Decimal

from django.db.models import QuerySet
from django.http import Http404
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from config.api import IsStaffOrReadOnly, error_responses, location_header
from eventing.api import (
    CONSISTENCY_PARAMETERS,
    ReadYourWritesMixin,
    command_token_header,
    with_consistency_token,
)

from . import selectors, services
from .models import StockItem
from .serializers import (
    StockItemAddSerializer,
    StockItemCommandSerializer,
    StockItemSerializer,
    StockReceiveSerializer,
)


class StockItemViewSet(
    ReadYourWritesMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Stock levels are read from the write model, so a token from an
    inventory command is reflected at once; a token from an orders command
    (place, cancel, ship) waits until inventory's policy applied it, so the
    reserved, released or committed stock shows."""

    consistency_consumer = selectors.STOCK_CONSUMER
    consistency_write_models = selectors.STOCK_WRITE_MODELS
    permission_classes = [IsStaffOrReadOnly]
    serializer_class = StockItemSerializer
    lookup_field = "sku"

    def get_serializer_class(self) -> type[serializers.Serializer]:
        # For the browsable API's forms; the actions name their serializers.
        if self.action == "create":
            return StockItemAddSerializer
        if self.action == "receive":
            return StockReceiveSerializer
        return StockItemSerializer

    def get_queryset(self) -> QuerySet[StockItem]:
        return selectors.stock_items()

    @extend_schema(
        parameters=CONSISTENCY_PARAMETERS,
        responses={200: StockItemSerializer(many=True), **error_responses(400, 401, 404)},
    )
    def list(self, request: Request, *args: object, **kwargs: object) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(
        parameters=CONSISTENCY_PARAMETERS,
        responses={200: StockItemSerializer, **error_responses(400, 401, 404)},
    )
    def retrieve(self, request: Request, *args: object, **kwargs: object) -> Response:
        return super().retrieve(request, *args, **kwargs)

    @extend_schema(
        request=StockItemAddSerializer,
        responses={201: StockItemCommandSerializer, **error_responses(400, 401, 403)},
        parameters=[location_header(), command_token_header(201)],
        description="Add a catalog item with its opening stock (staff). Orders learn of it "
        "from `inventory.StockItemAdded`, so it can be ordered a moment later.",
    )
    def create(self, request: Request) -> Response:
        incoming = StockItemAddSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        try:
            item = services.item_add(
                sku=data["sku"],
                name=data["name"],
                unit_price=Decimal(data["unit_price"]),
                on_hand=data["on_hand"],
                low_stock_threshold=data["low_stock_threshold"],
            )
        except services.InventoryError as exc:
            # Lost the race to another request adding the same SKU.
            raise serializers.ValidationError({"sku": [str(exc)]}) from exc
        response = Response(StockItemCommandSerializer(item).data, status=status.HTTP_201_CREATED)
        response["Location"] = reverse("stock-item-detail", kwargs={"sku": item.sku})
        return with_consistency_token(response, item)

    @extend_schema(
        request=StockReceiveSerializer,
        responses={200: StockItemCommandSerializer, **error_responses(400, 401, 403, 404)},
        parameters=[command_token_header(200)],
        description="Receive stock (staff): on_hand goes up by `quantity`.",
    )
    @action(detail=True, methods=["post"])
    def receive(self, request: Request, sku: str) -> Response:
        if not selectors.stock_item_exists(sku=sku):
            raise Http404  # items are never deleted: no race with the service
        incoming = StockReceiveSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        item = services.stock_receive(sku=sku, quantity=incoming.validated_data["quantity"])
        response = Response(StockItemCommandSerializer(item).data)
        return with_consistency_token(response, item)
