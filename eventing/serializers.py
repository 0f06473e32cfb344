"""Serializers of the platform's REST views (event store browser, ops status)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from .models import StoredEvent


class StoredEventSerializer(serializers.Serializer):
    """A stored event as its CloudEvents 1.0 envelope: the API shows exactly
    what consumers receive (`StoredEvent.envelope()`). The fields below
    describe that shape for the schema."""

    specversion = serializers.CharField(read_only=True)
    id = serializers.UUIDField(read_only=True)
    source = serializers.CharField(read_only=True)
    type = serializers.CharField(read_only=True)
    subject = serializers.CharField(read_only=True, help_text="<aggregatetype>/<aggregateid>")
    time = serializers.DateTimeField(read_only=True)
    datacontenttype = serializers.CharField(read_only=True)
    dataschemaversion = serializers.IntegerField(read_only=True)
    aggregatetype = serializers.CharField(read_only=True)
    aggregateid = serializers.CharField(read_only=True)
    aggregateversion = serializers.IntegerField(read_only=True)
    position = serializers.IntegerField(read_only=True, help_text="global order of the store")
    correlationid = serializers.CharField(read_only=True)
    causationid = serializers.CharField(read_only=True, help_text="id of the event that caused it")
    traceparent = serializers.CharField(read_only=True)
    actor = serializers.CharField(read_only=True)
    chaindepth = serializers.IntegerField(read_only=True)
    data = serializers.JSONField(read_only=True, help_text="payload as stored (not upcast)")

    def to_representation(self, instance: StoredEvent) -> dict[str, Any]:
        return instance.envelope()


class EventFilterSerializer(serializers.Serializer):
    """Query parameters of `GET /api/events/` (all optional, combined with AND)."""

    aggregate_id = serializers.CharField(required=False, max_length=100)
    aggregate_type = serializers.CharField(required=False, max_length=100)
    type = serializers.CharField(required=False, max_length=150, help_text="event type name")
    correlation_id = serializers.CharField(required=False, max_length=64)
    after = serializers.IntegerField(
        required=False, min_value=0, help_text="only events with a greater position (tailing)"
    )


class OutboxStatusSerializer(serializers.Serializer):
    pending = serializers.IntegerField(help_text="rows not yet confirmed by the broker")
    failing = serializers.IntegerField(help_text="pending rows whose publish failed at least once")
    oldest_age_seconds = serializers.FloatField(allow_null=True)


class DeadLetterStatusSerializer(serializers.Serializer):
    open = serializers.IntegerField()
    by_consumer = serializers.DictField(child=serializers.IntegerField())


class ParkedLaneSerializer(serializers.Serializer):
    consumer = serializers.CharField()
    aggregate_type = serializers.CharField()
    aggregate_id = serializers.CharField()
    version = serializers.IntegerField(help_text="last version the consumer applied")
    reason = serializers.CharField()
    since = serializers.DateTimeField()


class ParkedLanesSerializer(serializers.Serializer):
    count = serializers.IntegerField()
    shown = ParkedLaneSerializer(many=True, help_text="the oldest parked lanes (at most 50)")


class QueueDepthSerializer(serializers.Serializer):
    ready = serializers.IntegerField(help_text="messages waiting on the consumer's queue")
    consumers = serializers.IntegerField(help_text="workers consuming the queue")


class LagSerializer(serializers.Serializer):
    events = serializers.IntegerField(
        help_text="subscribed events not yet applied (among the newest 50,000)"
    )
    oldest_age_seconds = serializers.FloatField(allow_null=True)


class ConsumerStatusSerializer(serializers.Serializer):
    consumer = serializers.CharField()
    queue = serializers.CharField()
    queue_depth = QueueDepthSerializer(allow_null=True, help_text="null when the broker is down")
    lag = LagSerializer()
    paused = serializers.BooleanField(help_text="paused by a running replay_events")
    dead_letters = serializers.IntegerField()
    parked_lanes = serializers.IntegerField()


class EventingStatusSerializer(serializers.Serializer):
    generated_at = serializers.DateTimeField()
    outbox = OutboxStatusSerializer()
    consumers = ConsumerStatusSerializer(many=True)
    dead_letters = DeadLetterStatusSerializer()
    parked_lanes = ParkedLanesSerializer()
