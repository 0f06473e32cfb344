from __future__ import annotations

from rest_framework import serializers

from .models import Order
from .services import MAX_LINES, MAX_QUANTITY


class OrderLineInSerializer(serializers.Serializer):
    sku = serializers.CharField(max_length=64)
    quantity = serializers.IntegerField(min_value=1, max_value=MAX_QUANTITY)


class OrderPlaceSerializer(serializers.Serializer):
    lines = OrderLineInSerializer(many=True, allow_empty=False, max_length=MAX_LINES)


class OrderLineSerializer(serializers.Serializer):
    sku = serializers.CharField()
    quantity = serializers.IntegerField()
    unit_price = serializers.DecimalField(max_digits=12, decimal_places=2)


class OrderSerializer(serializers.ModelSerializer):
    lines = OrderLineSerializer(many=True, read_only=True)

    class Meta:
        model = Order
        fields = ["id", "status", "lines", "total", "rejection_reasons", "created_at", "updated_at"]
        read_only_fields = fields
