from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from eventing.models import StoredEvent

from . import services
from .models import CatalogItem, InvalidTransition, Order, OrderSummary


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Order)
class OrderAdmin(ReadOnlyAdmin):
    """Orders change only through domain methods, so admin actions emit the
    same events as the API. The change page is view-only: saving it would
    rewrite the row without an event."""

    list_display = ["id", "customer", "status", "total", "created_at"]
    list_filter = ["status"]
    search_fields = ["=id", "customer__username"]
    actions = ["cancel_selected", "ship_selected"]
    readonly_fields = ["event_timeline"]

    @admin.display(description="event timeline")
    def event_timeline(self, obj: Order) -> str:
        """Every stored event about this order, from every app: the order's
        own stream, inventory's reservation and notifications' deliveries are
        all keyed by the order id. Each links to the event store browser,
        where causation links lead on."""
        rows = StoredEvent.objects.filter(aggregate_id=str(obj.pk)).order_by("position")
        return format_html(
            '<table class="event-timeline"><thead><tr><th>time</th><th>event</th>'
            "<th>stream</th><th>version</th></tr></thead><tbody>{}</tbody></table>",
            format_html_join(
                "",
                '<tr><td>{}</td><td><a href="{}">{}</a></td><td>{}</td><td>{}</td></tr>',
                (
                    (
                        row.time.isoformat(timespec="milliseconds"),
                        reverse("admin:eventing_storedevent_change", args=[row.pk]),
                        row.event_type,
                        row.aggregate_type,
                        row.version,
                    )
                    for row in rows
                ),
            ),
        )

    def has_transition_permission(self, request: HttpRequest) -> bool:
        # The actions need the change permission the view-only page withholds.
        return request.user.has_perm("orders.change_order")

    def _apply(self, request: HttpRequest, queryset: QuerySet[Order], command: Any) -> None:
        done = 0
        for order in queryset:
            try:
                command(order_id=str(order.pk))
                done += 1
            except InvalidTransition as exc:
                self.message_user(request, f"{order.pk}: {exc}", messages.ERROR)
        if done:
            self.message_user(request, f"{done} order(s) updated.", messages.SUCCESS)

    @admin.action(description="Cancel selected orders", permissions=["transition"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        self._apply(request, queryset, services.order_cancel)

    @admin.action(description="Ship selected orders", permissions=["transition"])
    def ship_selected(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        self._apply(request, queryset, services.order_ship)


@admin.register(OrderSummary)
class OrderSummaryAdmin(ReadOnlyAdmin):
    """The read model, as built by the orders consumer (rebuild it by replay)."""

    list_display = ["order_id", "customer_id", "status", "total", "placed_at", "updated_at"]
    list_filter = ["status"]
    search_fields = ["=order_id", "=customer_id"]
    exclude = ["timeline"]
    readonly_fields = ["pretty_timeline"]

    @admin.display(description="timeline")
    def pretty_timeline(self, obj: OrderSummary) -> str:
        return format_html("<pre>{}</pre>", json.dumps(obj.timeline, indent=2, sort_keys=True))


@admin.register(CatalogItem)
class CatalogItemAdmin(ReadOnlyAdmin):
    """Orders' copy of the catalog, built from inventory's events."""

    list_display = ["sku", "name", "unit_price"]
