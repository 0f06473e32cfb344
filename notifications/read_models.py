"""The notification inbox projection."""

from __future__ import annotations

from eventing.consumers import Projection, ReadModel

from .models import Notification

# Rows are identified by their source event (surrogate ids change on a
# rebuild); delivery bookkeeping (when and how often it was sent) is state of
# the live path, not derived from events, so diffs ignore it.
INBOX = Projection(
    "notifications.inbox",
    [
        ReadModel(
            Notification,
            key_field="aggregate_id",
            natural_key=("source_event_id",),
            compare_exclude=("id", "recorded_at", "sent_at", "send_attempts", "last_error"),
        )
    ],
)
