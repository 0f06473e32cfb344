from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from eventing.api import CATCHING_UP, CURRENT, ConsistencyToken

from .models import Order, OrderSummary
from .services import MAX_LINES, MAX_QUANTITY

# -- input ----------------------------------------------------------------------


class OrderLineInSerializer(serializers.Serializer):
    sku = serializers.CharField(max_length=64)
    quantity = serializers.IntegerField(min_value=1, max_value=MAX_QUANTITY)


class OrderPlaceSerializer(serializers.Serializer):
    lines = OrderLineInSerializer(many=True, allow_empty=False, max_length=MAX_LINES)

    def validate_lines(self, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Shaped like DRF's own list errors ({index: {field: [...]}}). The
        # service checks this too; catching it here keeps the error shape one.
        errors: dict[int, dict[str, list[str]]] = {}
        seen: set[str] = set()
        for index, line in enumerate(lines):
            if line["sku"] in seen:
                errors[index] = {"sku": [f"duplicate line for {line['sku']}"]}
            seen.add(line["sku"])
        if errors:
            raise serializers.ValidationError(errors)
        return lines


class OrderCancelSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class CaseInsensitiveChoiceField(serializers.ChoiceField):
    def to_internal_value(self, data: Any) -> Any:
        return super().to_internal_value(data.upper() if isinstance(data, str) else data)


class OrderListFilterSerializer(serializers.Serializer):
    status = CaseInsensitiveChoiceField(
        choices=Order.Status.choices, required=False, help_text="case-insensitive"
    )


# -- output ---------------------------------------------------------------------


class OrderLineSerializer(serializers.Serializer):
    sku = serializers.CharField()
    quantity = serializers.IntegerField()
    unit_price = serializers.DecimalField(max_digits=12, decimal_places=2)


class RejectionReasonSerializer(serializers.Serializer):
    sku = serializers.CharField()
    requested = serializers.IntegerField()
    available = serializers.IntegerField()
    reason = serializers.CharField()


class OrderSerializer(serializers.ModelSerializer):
    """A command's answer, from the write model (the read model may not have
    caught up yet). `consistency_token` names the write; pass it to a query."""

    lines = OrderLineSerializer(many=True, read_only=True)
    rejection_reasons = RejectionReasonSerializer(many=True, read_only=True)
    consistency_token = serializers.SerializerMethodField()

    class Meta:
        model = Order
        fields = [
            "id",
            "status",
            "lines",
            "total",
            "rejection_reasons",
            "created_at",
            "updated_at",
            "consistency_token",
        ]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.STR)
    def get_consistency_token(self, order: Order) -> str:
        return str(ConsistencyToken.for_aggregate(order))


class OrderListItemSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="order_id", read_only=True)
    lines = OrderLineSerializer(many=True, read_only=True)
    created_at = serializers.DateTimeField(source="placed_at", read_only=True)

    class Meta:
        model = OrderSummary
        fields = ["id", "status", "lines", "total", "created_at", "updated_at"]
        read_only_fields = fields


class TimelineEntrySerializer(serializers.Serializer):
    position = serializers.IntegerField(help_text="global position in the event store")
    type = serializers.CharField(help_text="event type, e.g. orders.OrderPlaced")
    aggregate = serializers.CharField(help_text="<aggregate_type>/<aggregate_id>")
    version = serializers.IntegerField()
    time = serializers.DateTimeField()
    event_id = serializers.UUIDField()
    detail = serializers.DictField(required=False, help_text="e.g. rejection reasons")


class OrderDetailSerializer(serializers.Serializer):
    """An order from the `OrderSummary` read model (see `orders.selectors.OrderView`)."""

    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=Order.Status.choices)
    lines = OrderLineSerializer(many=True)
    total = serializers.DecimalField(max_digits=14, decimal_places=2)
    rejection_reasons = RejectionReasonSerializer(many=True)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    timeline = TimelineEntrySerializer(
        many=True, help_text="every event that touched the order, any app, by position"
    )
    consistency = serializers.ChoiceField(
        choices=[CURRENT, CATCHING_UP],
        help_text="current: the summary reflects every command on this order; "
        "catching-up: it lags (then timeline may be empty)",
    )
    consistency_token = serializers.CharField(help_text="token of the order's latest write")
