"""REST endpoint for the notification inbox."""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from config.api import error_responses
from eventing.api import CONSISTENCY_PARAMETERS, ReadYourWritesMixin

from . import selectors
from .models import Notification
from .serializers import NotificationFilterSerializer, NotificationSerializer


class NotificationViewSet(ReadYourWritesMixin, mixins.ListModelMixin, viewsets.GenericViewSet):
    """The caller's inbox, newest first. A consistency token from an orders
    command waits until its notification (if it makes one) is recorded."""

    consistency_consumer = selectors.INBOX_CONSUMER
    serializer_class = NotificationSerializer
    queryset = Notification.objects.none()  # schema introspection only

    def get_queryset(self) -> QuerySet[Notification]:
        filters = NotificationFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        return selectors.inbox_for(
            user=self.request.user, order_id=filters.validated_data.get("order_id")
        )

    @extend_schema(
        parameters=[NotificationFilterSerializer, *CONSISTENCY_PARAMETERS],
        responses={200: NotificationSerializer(many=True), **error_responses(400, 401, 404)},
    )
    def list(self, request: Request, *args: object, **kwargs: object) -> Response:
        return super().list(request, *args, **kwargs)
