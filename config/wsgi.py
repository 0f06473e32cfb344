import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# [observability] Tracing (a no-op unless OTEL_* names an exporter) must be set up
# before the handler loads the middleware: it adds OpenTelemetry's to MIDDLEWARE.
from eventing.observe import instrument_web

instrument_web()
application = get_wsgi_application()
