"""The Celery application: `celery -A config worker|beat|flower`."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("eventflow")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# [observability] Pool children: tracing setup, metric files marked dead on exit; log
# lines of consumer tasks carry the event they handle (eventing/observe.py).
from eventing.observe import instrument_celery  # noqa: E402

instrument_celery(app)

# Database connections. Celery's Django fixup closes every connection after
# every task unless CELERY_DB_REUSE_MAX is set: a new PostgreSQL connection per
# event was about a fifth of a consumer's time (BENCHMARKS.md). Keep them, and
# let Django's own CONN_MAX_AGE and CONN_HEALTH_CHECKS decide, around every
# task, when one must go (a terminated backend, an error left mid-transaction).
app.conf.CELERY_DB_REUSE_MAX = 1_000_000_000


@signals.task_prerun.connect(dispatch_uid="eventflow.refresh_db_connections_before")
@signals.task_postrun.connect(dispatch_uid="eventflow.refresh_db_connections_after")
def _refresh_db_connections(**kwargs: object) -> None:
    from django.db import close_old_connections

    close_old_connections()
