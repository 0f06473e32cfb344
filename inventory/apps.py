from django.apps import AppConfig


class InventoryConfig(AppConfig):
    name = "inventory"

    def ready(self) -> None:
        from . import events, handlers  # noqa: F401 - registers events and handlers
