"""Settings for the test suite: the real services, isolated queue names.

The queue prefix keeps the suite's messages apart from a platform started by
`make run` on the same broker; retries are fast so failure paths finish
within a test's deadline.
"""

import os

os.environ.setdefault("EVENTING_QUEUE_PREFIX", "test.")
os.environ.setdefault("DEBUG", "1")
os.environ.setdefault("EVENTING_RETRY_BASE_SECONDS", "0.05")
os.environ.setdefault("EVENTING_RETRY_MAX_SECONDS", "0.5")
os.environ.setdefault("EVENTING_MAX_ATTEMPTS", "3")
os.environ.setdefault("EVENTING_RELAY_LEASE_SECONDS", "5")
os.environ.setdefault("EMAIL_BACKEND", "django.core.mail.backends.locmem.EmailBackend")

from .settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Two test sessions on one machine (two developers, or CI beside a developer)
# must not share a test database or queues: set TEST_DATABASE_NAME and
# EVENTING_QUEUE_PREFIX per session.
DATABASES["default"]["TEST"] = {  # noqa: F405
    "NAME": os.environ.get("TEST_DATABASE_NAME", "test_eventflow"),
}
