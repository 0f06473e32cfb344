from django.apps import AppConfig


class EventingConfig(AppConfig):
    name = "eventing"
    verbose_name = "Eventing"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks
