from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from eventing.api import EventingStatusView, EventViewSet
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

urlpatterns = [
    path("", RedirectView.as_view(url="/api/", permanent=False)),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
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
