from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"

    def ready(self) -> None:
        from . import events, handlers  # noqa: F401 - registers events and handlers
