"""Publishing to RabbitMQ with batched publisher confirms.

A batch is published without waiting, then the channel is drained until the
broker has acked (or nacked, or returned) every message: one round trip per
batch instead of one per message. Messages are persistent and `mandatory`, so
an unroutable message comes back as basic.return instead of being confirmed
and silently dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import amqp
from kombu import Connection
from kombu.serialization import dumps

logger = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """The connection failed or confirms timed out. `partial` holds what the
    broker did confirm (or refuse) before that; nothing else is known."""

    def __init__(self, message: str, partial: BatchResult | None = None) -> None:
        super().__init__(message)
        self.partial = partial or BatchResult(confirmed=set(), failed={})


@dataclasses.dataclass
class OutgoingMessage:
    # The caller's handles (outbox row ids) of what the message carries; a
    # batch message carries several rows, and a row may go out in several
    # messages (one per consumer). Results are per key.
    keys: tuple[Any, ...]
    routing_key: str
    body: Any
    headers: dict[str, Any]
    properties: dict[str, Any]


@dataclasses.dataclass
class BatchResult:
    confirmed: set[Any]
    failed: dict[Any, str]


class ConfirmingPublisher:
    """One broker connection in confirm mode. Not thread-safe; one per process."""

    def __init__(self, broker_url: str, queues: list[Any], confirm_timeout: float = 10.0) -> None:
        self.broker_url = broker_url
        self.queues = queues
        self.confirm_timeout = confirm_timeout
        self._kombu: Connection | None = None
        self._channel: amqp.Channel | None = None
        self._next_tag = 1
        self._pending: dict[int, Any] = {}
        # Messages not yet confirmed per caller key: a key counts as confirmed
        # only once every message made from it is.
        self._outstanding: dict[Any, int] = {}
        self._results: BatchResult | None = None
        self._returned: dict[str, str] = {}

    # -- connection -----------------------------------------------------------
    def _ensure_channel(self) -> amqp.Channel:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.close()
        conn = Connection(self.broker_url, connect_timeout=5, heartbeat=0)
        conn.ensure_connection(max_retries=1)
        channel = conn.channel()
        # Declaring is idempotent; it makes the queues exist before the first
        # mandatory publish, whichever process starts first.
        for queue in self.queues:
            queue.bind(channel).declare()
        raw: amqp.Channel = channel  # pyamqp transport: kombu hands out amqp.Channel
        raw.confirm_select()
        raw.events["basic_ack"].add(self._on_ack)
        raw.events["basic_nack"].add(self._on_nack)
        raw.events["basic_return"].add(self._on_return)
        self._kombu = conn
        self._channel = raw
        self._next_tag = 1
        return raw

    def connect(self) -> None:
        """Open the connection (if it is not open): the relay connects before
        it opens a batch's transaction. PublishError if the broker cannot be
        reached."""
        try:
            self._ensure_channel()
        except Exception as exc:
            self.close()
            raise PublishError(f"broker connection failed: {exc}") from exc

    def ready_messages(self, queue_names: list[str]) -> int:
        """Messages waiting on these queues that no consumer has taken yet
        (a worker holds up to its prefetch unacked; more stay ready). One
        round trip per queue on this connection. A queue that cannot be
        looked at counts as empty, and its error closes the connection
        (the next publish opens a new one)."""
        channel = self._ensure_channel()
        ready = 0
        for name in queue_names:
            try:
                _, count, _ = channel.queue_declare(name, passive=True)
            except Exception:
                logger.debug("could not look at queue %s", name, exc_info=True)
                self.close()
                return ready
            ready += count
        return ready

    def close(self) -> None:
        if self._kombu is not None:
            try:
                self._kombu.release()
            except Exception:
                logger.debug("closing broker connection failed", exc_info=True)
        self._kombu = None
        self._channel = None

    # -- confirm callbacks ----------------------------------------------------
    def _settle(self, delivery_tag: int, multiple: bool, error: str | None) -> None:
        assert self._results is not None
        tags = [t for t in self._pending if t <= delivery_tag] if multiple else [delivery_tag]
        for tag in tags:
            keys = self._pending.pop(tag, None)
            if keys is None:
                continue
            returned = self._returned.pop(str(tag), None)
            reason = error or returned
            for key in keys:
                if reason:
                    self._results.failed[key] = reason
                    self._results.confirmed.discard(key)
                    continue
                self._outstanding[key] -= 1
                if self._outstanding[key] == 0 and key not in self._results.failed:
                    self._results.confirmed.add(key)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, None)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, "broker nacked the message")

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        # A return precedes the ack of the same message; remember it by tag.
        tag = message.properties.get("message_id") or ""
        self._returned[str(tag)] = f"unroutable: no queue bound for {routing_key!r} ({exc})"

    # -- publishing -----------------------------------------------------------
    def publish_batch(self, messages: list[OutgoingMessage]) -> BatchResult:
        """Publish all, wait for every confirm. Raises PublishError on I/O loss;
        then no message of the batch may be assumed delivered."""
        self._results = BatchResult(confirmed=set(), failed={})
        self._pending = {}
        self._returned = {}
        self._outstanding = {}
        for outgoing in messages:
            for key in outgoing.keys:
                self._outstanding[key] = self._outstanding.get(key, 0) + 1
        if not messages:
            return self._results
        try:
            channel = self._ensure_channel()
            for outgoing in messages:
                tag = self._next_tag
                self._next_tag += 1
                if isinstance(outgoing.body, bytes):  # already serialized JSON
                    content_type, encoding, data = "application/json", "utf-8", outgoing.body
                else:
                    content_type, encoding, data = dumps(outgoing.body, serializer="json")
                props = dict(outgoing.properties)
                msg = amqp.Message(
                    data,
                    content_type=content_type,
                    content_encoding=encoding,
                    application_headers=outgoing.headers,
                    delivery_mode=2,
                    # Our delivery tag travels as message_id so a basic.return
                    # can be matched to the publish it rejects.
                    message_id=str(tag),
                    **props,
                )
                self._pending[tag] = outgoing.keys
                channel._basic_publish(
                    msg, exchange="", routing_key=outgoing.routing_key, mandatory=True
                )
            deadline = time.monotonic() + self.confirm_timeout
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PublishError(
                        f"{len(self._pending)} confirms not received in time", self._results
                    )
                try:
                    channel.connection.drain_events(timeout=remaining)
                except TimeoutError:
                    continue
        except PublishError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise PublishError(f"broker connection failed: {exc}", self._results) from exc
        return self._results
