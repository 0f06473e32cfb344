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
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

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
    "PAGE_SIZE": 50,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "eventflow API",
    "DESCRIPTION": "Orders, inventory and notifications, choreographed by domain events.",
    "VERSION": "0.1.0",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
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
    # SKIP LOCKED and leased), so no singleton is needed.
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
}

# --- eventing ---------------------------------------------------------------
EVENTING = {
    "SOURCE": env.str("EVENTING_SOURCE", default="/eventflow"),
    "RELAY_BATCH_SIZE": env.int("EVENTING_RELAY_BATCH_SIZE", default=500),
    "RELAY_LEASE_SECONDS": env.float("EVENTING_RELAY_LEASE_SECONDS", default=30.0),
    "RELAY_MAX_SECONDS": env.float("EVENTING_RELAY_MAX_SECONDS", default=10.0),
    "MAX_ATTEMPTS": env.int("EVENTING_MAX_ATTEMPTS", default=5),
    "RETRY_BASE_SECONDS": env.float("EVENTING_RETRY_BASE_SECONDS", default=1.0),
    "RETRY_MAX_SECONDS": env.float("EVENTING_RETRY_MAX_SECONDS", default=60.0),
    "MAX_CHAIN_DEPTH": env.int("EVENTING_MAX_CHAIN_DEPTH", default=20),
    # Read-your-writes: how long a query given a consistency token waits.
    "CONSISTENCY_WAIT_SECONDS": env.float("EVENTING_CONSISTENCY_WAIT_SECONDS", default=5.0),
    "CONSISTENCY_POLL_SECONDS": env.float("EVENTING_CONSISTENCY_POLL_SECONDS", default=0.02),
    "QUEUE_PREFIX": EVENTING_QUEUE_PREFIX,
}

# A test-only switch: when set to a consumer name, that consumer's handlers
# raise, so a person can watch a dead letter being made and redriven.
EVENTING_FAIL_CONSUMER = env.str("EVENTING_FAIL_CONSUMER", default="")
# ...optionally only for one aggregate id, so the other lanes keep flowing.
EVENTING_FAIL_AGGREGATE = env.str("EVENTING_FAIL_AGGREGATE", default="")
