from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from eventing.api import EventingStatusView, EventViewSet
from eventing.dashboard import dashboard_view
from eventing.metrics import metrics_view
from inventory.api import StockItemViewSet
from notifications.api import NotificationViewSet
from orders.api import OrderViewSet

from .api import TokenObtainView
from .views import healthz, readyz

router = DefaultRouter()
router.register("orders", OrderViewSet, basename="order")
router.register("inventory/items", StockItemViewSet, basename="stock-item")
router.register("notifications", NotificationViewSet, basename="notification")
router.register("events", EventViewSet, basename="event")

# [observability] The admin index links to the eventing dashboard.
admin.site.index_template = "eventing/admin_index.html"

urlpatterns = [
    path("", RedirectView.as_view(url="/api/", permanent=False)),
    # [observability] Staff only (admin_view: others are sent to the admin login).
    path(
        "admin/eventing/dashboard/",
        admin.site.admin_view(dashboard_view),
        name="eventing-dashboard",
    ),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    # [observability] Prometheus scrape endpoint; METRICS_TOKEN makes it require a bearer token.
    path("metrics", metrics_view, name="metrics"),
    path("readyz", readyz, name="readyz"),
    path("api/auth/token/", TokenObtainView.as_view(), name="api-token"),
    # The schema and its docs are public: they are the contract clients script
    # against and hold no data (SPECTACULAR_SETTINGS SERVE_PERMISSIONS default).
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/eventing/status/", EventingStatusView.as_view(), name="eventing-status"),
    path("api/", include(router.urls)),
    path("api-auth/", include("rest_framework.urls")),
]

# [security] URLs no route matches answer JSON under /api/ (with DEBUG off).
handler404 = "config.views.not_found"
