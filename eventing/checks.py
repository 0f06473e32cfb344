"""System checks: the event and handler registries are consistent."""

from __future__ import annotations

from typing import Any

from django.core import checks

from .consumers import registry as consumers
from .events import registry as events


@checks.register("eventing")
def check_registries(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for problem in consumers.unknown_subscriptions:
        errors.append(checks.Error(problem, id="eventing.E001", hint="Register the event class."))
    for clash in events.duplicates:
        errors.append(
            checks.Error(
                f"duplicate event name {clash}",
                id="eventing.E002",
                hint="Event names are stable and unique; rename the new one.",
            )
        )
    for gap in events.missing_upcasters():
        errors.append(
            checks.Error(
                f"missing upcaster {gap}",
                id="eventing.E003",
                hint="Add @upcaster(EventClass, from_version=N) for each step to the current one.",
            )
        )
    for consumer in consumers.all():
        seen: set[str] = set()
        for specs in consumer.handlers.values():
            for spec in specs:
                key = f"{spec.event_name}:{spec.qualname}"
                if key in seen:
                    errors.append(
                        checks.Error(
                            f"{spec.qualname} is registered twice for {spec.event_name}",
                            id="eventing.E004",
                        )
                    )
                seen.add(key)
    return errors
