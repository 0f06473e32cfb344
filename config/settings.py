"""Settings, read from the environment with defaults for the local services.

`DEBUG` is off unless set; with it off, `SECRET_KEY` must come from the
environment (`make run` writes one into `.env` on first start).
"""

from __future__ import annotations

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# `.env` is written by `make run`; real environment variables win over it.
# ENV_FILE names another file (a deployment reads none: ENV_FILE=/dev/null).
environ.Env.read_env(env.str("ENV_FILE", default=str(BASE_DIR / ".env")), overwrite=False)

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set in the environment when DEBUG is off "
            "(`make run` writes one to .env; or export DEBUG=1 for development)."
        )
    SECRET_KEY = "insecure-development-only-key"  # noqa: S105 - DEBUG only

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# --- security -----------------------------------------------------------------
# Production-safe whenever DEBUG is off (`manage.py check --deploy` is clean):
# HTTPS only, secure cookies, HSTS. A local run over plain HTTP says HTTPS=0
# (`make setup` writes it to .env); each setting can also be overridden alone.
HTTPS = env.bool("HTTPS", default=not DEBUG)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=HTTPS)
# Probes and scrapes come over plain HTTP from inside the deployment.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
# Behind a TLS-terminating proxy that sets X-Forwarded-Proto (and strips a client's).
if env.bool("SECURE_PROXY_SSL_HEADER", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=HTTPS)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=HTTPS)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=HTTPS)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=HTTPS)
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Request bodies: the largest legitimate one (an order of 100 lines) is ~10 KB.
# Bigger bodies are refused with 400 before they are read.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=1024 * 1024)
DATA_UPLOAD_MAX_NUMBER_FIELDS = 1000

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "eventing",
    "orders",
    "inventory",
    "notifications",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "eventing.middleware.EventContextMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db_url("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/eventflow")
}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
# Used by the file-based backend (the test suite counts the mails it writes).
EMAIL_FILE_PATH = env.str("EMAIL_FILE_PATH", default=str(BASE_DIR / "test-artifacts" / "mail"))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="shop@example.com")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    # [security] DRF's parsers, with JSON nested too deeply answered 400 (not 500).
    "DEFAULT_PARSER_CLASSES": [
        "config.parsers.JSONParserWithDepthLimit",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "PAGE_SIZE": 50,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "eventflow API",
    "DESCRIPTION": "Orders, inventory and notifications, choreographed by domain events.",
    "VERSION": "0.1.0",
}

# [observability] LOG_FORMAT=json writes one JSON object a line. In either format, lines
# written while a consumer handles an event carry its id, type, correlation id and the
# consumer (eventing/logging.py; the Celery worker's own handlers get the same in
# eventing.observe.instrument_celery).
LOG_FORMAT = env.str("LOG_FORMAT", default="plain")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"event_context": {"()": "eventing.logging.EventContextFilter"}},
    "formatters": {
        "plain": {
            "()": "eventing.logging.PlainFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
        "json": {"()": "eventing.logging.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["event_context"],
        }
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}

# --- Celery -----------------------------------------------------------------
# One durable queue per consuming app plus one for the relay. A queue prefix
# lets the test suite share a broker with a running platform without either
# consuming the other's messages.
EVENTING_QUEUE_PREFIX = env.str("EVENTING_QUEUE_PREFIX", default="")
EVENTING_RELAY_QUEUE = f"{EVENTING_QUEUE_PREFIX}relay"


def _queue(name: str) -> Queue:
    full = f"{EVENTING_QUEUE_PREFIX}{name}"
    return Queue(full, Exchange("", type="direct"), routing_key=full, durable=True)


CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="amqp://guest:guest@127.0.0.1:5672//")
CELERY_TASK_QUEUES = [_queue(n) for n in ("orders", "inventory", "notifications", "relay")]
CELERY_TASK_DEFAULT_QUEUE = EVENTING_RELAY_QUEUE
CELERY_TASK_CREATE_MISSING_QUEUES = False
CELERY_TASK_ROUTES = {
    "eventing.relay": {"queue": EVENTING_RELAY_QUEUE},
    "notifications.send": {"queue": f"{EVENTING_QUEUE_PREFIX}notifications"},
    "notifications.send_batch": {"queue": f"{EVENTING_QUEUE_PREFIX}notifications"},
    "notifications.send_unsent": {"queue": f"{EVENTING_QUEUE_PREFIX}notifications"},
}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_WORKER_PREFETCH_MULTIPLIER = env.int("CELERY_WORKER_PREFETCH_MULTIPLIER", default=4)
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE = {
    # The safety net: whatever the on-commit wake-ups missed is published
    # within a second. Doubled beats are harmless (rows are claimed with
    # SKIP LOCKED in each batch's transaction), so no singleton is needed.
    "notifications-send-unsent": {  # the unsent-email sweep
        "task": "notifications.send_unsent",
        "schedule": 30.0,
        "options": {"queue": f"{EVENTING_QUEUE_PREFIX}notifications", "expires": 25},
    },
    "relay-outbox": {
        "task": "eventing.relay",
        "schedule": env.float("EVENTING_RELAY_INTERVAL", default=1.0),
        "options": {"queue": EVENTING_RELAY_QUEUE, "expires": 5},
    },
    # [observability] consumer lag history for the dashboard's chart (a doubled beat
    # only adds a second sample per minute).
    "eventing-sample-lag": {
        "task": "eventing.sample_lag",
        "schedule": env.float("EVENTING_LAG_SAMPLE_SECONDS", default=60.0),
        "options": {"queue": EVENTING_RELAY_QUEUE, "expires": 55},
    },
}

# --- eventing ---------------------------------------------------------------
EVENTING = {
    "SOURCE": env.str("EVENTING_SOURCE", default="/eventflow"),
    "RELAY_BATCH_SIZE": env.int("EVENTING_RELAY_BATCH_SIZE", default=500),
    "RELAY_LEASE_SECONDS": env.float("EVENTING_RELAY_LEASE_SECONDS", default=30.0),
    "RELAY_MAX_SECONDS": env.float("EVENTING_RELAY_MAX_SECONDS", default=10.0),
    # How a commit wakes the relay: "celery" (a relay task, run by the worker)
    # or "notify" (a PostgreSQL NOTIFY to a relay process, `manage.py
    # relay_outbox --loop`, one Celery round trip fewer). Beat's tick runs
    # the relay task every second either way.
    "RELAY_WAKE": env.str("EVENTING_RELAY_WAKE", default="celery"),
    # The relay process's longest pause between runs that publish while a
    # consumer queue holds messages no worker has taken (see relay_outbox).
    "RELAY_LINGER_SECONDS": env.float("EVENTING_RELAY_LINGER_SECONDS", default=1.0),
    # Events per consumer message: a consumer applies a message's events in one
    # transaction (one commit, one checkpoint round trip for all its lanes).
    "CONSUMER_BATCH_SIZE": env.int("EVENTING_CONSUMER_BATCH_SIZE", default=100),
    # A batch of several lanes waits at most this long for a lock, then is
    # applied lane by lane instead (kept well below PostgreSQL's 1 s
    # deadlock_timeout, so a batch never makes someone else a deadlock victim).
    "BATCH_LOCK_TIMEOUT_MS": env.int("EVENTING_BATCH_LOCK_TIMEOUT_MS", default=200),
    "MAX_ATTEMPTS": env.int("EVENTING_MAX_ATTEMPTS", default=5),
    "RETRY_BASE_SECONDS": env.float("EVENTING_RETRY_BASE_SECONDS", default=1.0),
    "RETRY_MAX_SECONDS": env.float("EVENTING_RETRY_MAX_SECONDS", default=60.0),
    "MAX_CHAIN_DEPTH": env.int("EVENTING_MAX_CHAIN_DEPTH", default=20),
    # Appends run as server-side prepared statements, prepared once per
    # connection. Off behind a pooler that shares server sessions between
    # clients (PgBouncer in transaction or statement mode).
    "PREPARED_APPEND": env.bool("EVENTING_PREPARED_APPEND", default=True),
    # Read-your-writes: how long a query given a consistency token waits.
    "CONSISTENCY_WAIT_SECONDS": env.float("EVENTING_CONSISTENCY_WAIT_SECONDS", default=5.0),
    "CONSISTENCY_POLL_SECONDS": env.float("EVENTING_CONSISTENCY_POLL_SECONDS", default=0.02),
    "QUEUE_PREFIX": EVENTING_QUEUE_PREFIX,
    # [observability] EVENTING_METRICS=0 turns metric recording off (benchmark comparisons).
    "METRICS": env.bool("EVENTING_METRICS", default=True),
}
if EVENTING["RELAY_WAKE"] not in ("celery", "notify"):
    raise ImproperlyConfigured(
        f"EVENTING_RELAY_WAKE={EVENTING['RELAY_WAKE']!r}: use 'celery' (the worker's relay "
        "task) or 'notify' (with a `manage.py relay_outbox --loop` process)"
    )

# [observability] /metrics is open unless METRICS_TOKEN is set; then it requires
# `Authorization: Bearer <token>` (eventing/metrics.py).
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

# A test-only switch: when set to a consumer name, that consumer's handlers
# raise, so a person can watch a dead letter being made and redriven.
EVENTING_FAIL_CONSUMER = env.str("EVENTING_FAIL_CONSUMER", default="")
# ...optionally only for one aggregate id, so the other lanes keep flowing.
EVENTING_FAIL_AGGREGATE = env.str("EVENTING_FAIL_AGGREGATE", default="")
