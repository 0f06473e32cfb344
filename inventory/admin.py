from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest

from . import services
from .models import Reservation, StockItem, StockLevel
from .serializers import MAX_STOCK_QUANTITY

ITEM_FIELDS = ["sku", "name", "unit_price", "on_hand", "low_stock_threshold"]
ITEM_READONLY = [
    "sku",
    "name",
    "unit_price",
    "on_hand",
    "reserved",
    "low_stock_threshold",
    "version",
]


class StockItemAdminForm(forms.ModelForm):
    receive = forms.IntegerField(
        label="Receive stock",
        min_value=1,
        max_value=MAX_STOCK_QUANTITY,
        required=False,
        help_text="Units that arrived: added to on hand (records inventory.StockReceived).",
    )

    class Meta:
        model = StockItem
        fields = ITEM_FIELDS


@admin.register(StockItem)
class StockItemAdmin(admin.ModelAdmin):
    """Adding an item and receiving stock go through the services, so they
    emit events like the API. The row itself is never saved from a form: a
    plain save would rewrite `reserved` without an event, racing the worker."""

    form = StockItemAdminForm
    list_display = [
        "sku",
        "name",
        "unit_price",
        "on_hand",
        "reserved",
        "available",
        "low_stock_threshold",
    ]
    search_fields = ["sku", "name"]

    def get_fields(self, request: HttpRequest, obj: StockItem | None = None) -> list[str]:
        return ITEM_FIELDS if obj is None else [*ITEM_READONLY, "receive"]

    def get_readonly_fields(self, request: HttpRequest, obj: StockItem | None = None) -> list[str]:
        return [] if obj is None else ITEM_READONLY

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(
        self, request: HttpRequest, obj: StockItem, form: forms.ModelForm, change: bool
    ) -> None:
        data = form.cleaned_data
        if not change:
            services.item_add(
                sku=data["sku"],
                name=data["name"],
                unit_price=data["unit_price"],
                on_hand=data["on_hand"],
                low_stock_threshold=data["low_stock_threshold"],
            )
            return
        if data.get("receive"):
            item = services.stock_receive(sku=obj.sku, quantity=data["receive"])
            self.message_user(
                request, f"Received {data['receive']} of {item.sku}: {item.on_hand} on hand."
            )
        else:
            self.message_user(request, "Nothing received; the item is unchanged.", messages.INFO)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        """No related objects; and the ModelForm was never saved (see save_model)."""


@admin.register(Reservation)
class ReservationAdmin(admin.ModelAdmin):
    """Written only by inventory's handlers: read-only here."""

    list_display = ["order_id", "status", "created_at"]
    list_filter = ["status"]
    search_fields = ["=order_id"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(StockLevel)
class StockLevelAdmin(admin.ModelAdmin):
    """The stock-level read model: rebuilt by replay_events, never edited."""

    list_display = ["sku", "on_hand", "reserved", "available"]
    search_fields = ["sku"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
