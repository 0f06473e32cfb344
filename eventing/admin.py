from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from . import consumers
from .models import Checkpoint, ConsumerState, DeadLetter, OutboxMessage, StoredEvent


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _pretty(data: Any) -> str:
    return format_html("<pre>{}</pre>", json.dumps(data, indent=2, sort_keys=True, default=str))


@admin.register(StoredEvent)
class StoredEventAdmin(ReadOnlyAdmin):
    list_display = ["position", "event_type", "aggregate_type", "aggregate_id", "version", "time"]
    list_display_links = ["position", "event_type"]
    list_filter = ["event_type", "aggregate_type"]
    search_fields = ["=aggregate_id", "=correlation_id", "=event_id", "=causation_id"]
    readonly_fields = ["causation_link", "caused_events", "pretty_payload"]
    exclude = ["payload"]

    @admin.display(description="payload")
    def pretty_payload(self, obj: StoredEvent) -> str:
        return _pretty(obj.payload)

    @admin.display(description="causation")
    def causation_link(self, obj: StoredEvent) -> str:
        cause = (
            StoredEvent.objects.filter(event_id=obj.causation_id).first()
            if obj.causation_id
            else None
        )
        if cause is None:
            return "-"
        url = reverse("admin:eventing_storedevent_change", args=[cause.pk])
        return format_html('<a href="{}">{}</a>', url, cause)

    @admin.display(description="caused")
    def caused_events(self, obj: StoredEvent) -> str:
        url = reverse("admin:eventing_storedevent_changelist") + f"?q={obj.event_id}"
        count = StoredEvent.objects.filter(causation_id=str(obj.event_id)).count()
        return format_html('<a href="{}">{} event(s)</a>', url, count)


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "event",
        "consumer",
        "created_at",
        "available_at",
        "attempts",
        "last_error",
    ]
    list_select_related = ["event"]


@admin.register(Checkpoint)
class CheckpointAdmin(ReadOnlyAdmin):
    list_display = ["consumer", "aggregate_type", "aggregate_id", "version", "duplicates", "parked"]
    list_filter = ["consumer", "parked", "aggregate_type"]
    search_fields = ["=aggregate_id"]


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    list_display = ["id", "consumer", "event", "status", "attempts", "created_at", "short_error"]
    list_filter = ["status", "consumer"]
    readonly_fields = [
        "consumer",
        "event",
        "error",
        "formatted_traceback",
        "attempts",
        "status",
        "created_at",
        "resolved_at",
        "resolved_by",
        "resolution_note",
        "pretty_message",
    ]
    exclude = ["message", "traceback"]
    actions = ["redrive_selected", "discard_selected"]

    @admin.display(description="traceback")
    def formatted_traceback(self, obj: DeadLetter) -> str:
        return format_html('<pre class="traceback">{}</pre>', obj.traceback)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="error")
    def short_error(self, obj: DeadLetter) -> str:
        return obj.error[:120]

    @admin.display(description="message")
    def pretty_message(self, obj: DeadLetter) -> str:
        return _pretty(obj.message)

    @admin.action(description="Redrive selected dead letters")
    def redrive_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        done = 0
        for dead in queryset.filter(status=DeadLetter.Status.OPEN):
            consumers.redrive(dead, by=request.user.get_username())
            done += 1
        self.message_user(request, f"Redrove {done} dead letter(s).", messages.SUCCESS)

    @admin.action(description="Discard selected dead letters (reason: discarded from admin)")
    def discard_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        done = 0
        for dead in queryset.filter(status=DeadLetter.Status.OPEN):
            consumers.discard(
                dead,
                reason=f"discarded from admin by {request.user.get_username()}",
                by=request.user.get_username(),
            )
            done += 1
        self.message_user(request, f"Discarded {done} dead letter(s).", messages.WARNING)


@admin.register(ConsumerState)
class ConsumerStateAdmin(ReadOnlyAdmin):
    """Paused while replay_events rebuilds a consumer's read models; an
    interrupted replay is resumed with `replay_events --resume`."""

    list_display = ["consumer", "paused", "paused_at", "paused_reason"]
