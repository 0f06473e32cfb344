from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from eventing.api import ConsistencyToken

from . import selectors
from .models import StockItem

# Generous, but inside the PositiveIntegerField column: a typo (an extra
# zero or ten) is refused instead of overflowing or distorting stock.
MAX_STOCK_QUANTITY = 1_000_000


class StockItemSerializer(serializers.ModelSerializer):
    available = serializers.IntegerField(read_only=True, help_text="on_hand - reserved")

    class Meta:
        model = StockItem
        fields = [
            "sku",
            "name",
            "unit_price",
            "on_hand",
            "reserved",
            "available",
            "low_stock_threshold",
        ]
        read_only_fields = fields


class StockItemCommandSerializer(StockItemSerializer):
    """A command's answer: the item after the write, plus its consistency token."""

    consistency_token = serializers.SerializerMethodField()

    class Meta(StockItemSerializer.Meta):
        fields = [*StockItemSerializer.Meta.fields, "consistency_token"]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.STR)
    def get_consistency_token(self, item: StockItem) -> str:
        return str(ConsistencyToken.for_aggregate(item))


class StockItemAddSerializer(serializers.Serializer):
    # No "/" or "." in a SKU: it is a URL path segment (and "." would clash
    # with format suffixes).
    sku = serializers.RegexField(
        r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        max_length=64,
        error_messages={"invalid": "use letters, digits, '-' and '_' only"},
    )
    name = serializers.CharField(max_length=200)
    unit_price = serializers.DecimalField(max_digits=12, decimal_places=2, min_value=0)
    on_hand = serializers.IntegerField(min_value=0, max_value=MAX_STOCK_QUANTITY)
    low_stock_threshold = serializers.IntegerField(
        min_value=0, max_value=MAX_STOCK_QUANTITY, required=False, default=0
    )

    def validate_sku(self, sku: str) -> str:
        if selectors.stock_item_exists(sku=sku):
            raise serializers.ValidationError(f"item {sku} already exists")
        return sku


class StockReceiveSerializer(serializers.Serializer):
    quantity = serializers.IntegerField(min_value=1, max_value=MAX_STOCK_QUANTITY)
