from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from . import services
from .models import CatalogItem, InvalidTransition, Order


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    """Orders change only through domain methods, so admin actions emit the
    same events as the API; the fields themselves are read-only."""

    list_display = ["id", "customer", "status", "total", "created_at"]
    list_filter = ["status"]
    search_fields = ["=id", "customer__username"]
    readonly_fields = [f.name for f in Order._meta.fields]
    actions = ["cancel_selected", "ship_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def _apply(self, request: HttpRequest, queryset: QuerySet[Order], command: Any) -> None:
        for order in queryset:
            try:
                command(order_id=str(order.pk))
            except InvalidTransition as exc:
                self.message_user(request, f"{order.pk}: {exc}", messages.ERROR)

    @admin.action(description="Cancel selected orders")
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        self._apply(request, queryset, services.order_cancel)

    @admin.action(description="Ship selected orders")
    def ship_selected(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        self._apply(request, queryset, services.order_ship)


@admin.register(CatalogItem)
class CatalogItemAdmin(admin.ModelAdmin):
    list_display = ["sku", "name", "unit_price"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
