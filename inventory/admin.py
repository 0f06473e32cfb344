from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import Reservation, StockItem


@admin.register(StockItem)
class StockItemAdmin(admin.ModelAdmin):
    list_display = [
        "sku",
        "name",
        "unit_price",
        "on_hand",
        "reserved",
        "available",
        "low_stock_threshold",
    ]
    readonly_fields = [
        "sku",
        "name",
        "unit_price",
        "on_hand",
        "reserved",
        "low_stock_threshold",
        "version",
    ]
    search_fields = ["sku", "name"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Reservation)
class ReservationAdmin(admin.ModelAdmin):
    list_display = ["order_id", "status", "created_at"]
    list_filter = ["status"]
    readonly_fields = ["order_id", "status", "lines", "created_at", "updated_at", "version"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
