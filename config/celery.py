"""The Celery application: `celery -A config worker|beat|flower`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("eventflow")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# [observability] Pool children: tracing setup, metric files marked dead on exit; log
# lines of consumer tasks carry the event they handle (eventing/observe.py).
from eventing.observe import instrument_celery  # noqa: E402

instrument_celery(app)
