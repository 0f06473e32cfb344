from __future__ import annotations

from rest_framework import serializers

from .models import Notification


class NotificationSerializer(serializers.ModelSerializer):
    audience = serializers.SerializerMethodField(help_text="customer, or staff for staff notices")

    class Meta:
        model = Notification
        fields = ["id", "kind", "audience", "subject", "body", "order_id", "created_at", "sent_at"]
        read_only_fields = fields

    def get_audience(self, notification: Notification) -> str:
        return "staff" if notification.customer_id is None else "customer"


class NotificationFilterSerializer(serializers.Serializer):
    order_id = serializers.UUIDField(required=False, help_text="only this order's notifications")
