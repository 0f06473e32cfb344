"""REST endpoints for orders. Thin: validation here, writes in services."""

from __future__ import annotations

from django.db.models import QuerySet
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from . import services
from .models import Order
from .serializers import OrderPlaceSerializer, OrderSerializer


class OrderViewSet(mixins.RetrieveModelMixin, mixins.ListModelMixin, viewsets.GenericViewSet):
    serializer_class = OrderSerializer

    def get_queryset(self) -> QuerySet[Order]:
        qs = Order.objects.all()
        user = self.request.user
        if not user.is_staff:
            # Another customer's order is indistinguishable from a missing one.
            qs = qs.filter(customer=user)
        status_filter = self.request.query_params.get("status")
        if status_filter:
            qs = qs.filter(status=status_filter.upper())
        return qs

    @extend_schema(request=OrderPlaceSerializer, responses={201: OrderSerializer})
    def create(self, request: Request) -> Response:
        incoming = OrderPlaceSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        try:
            order = services.order_place(
                customer_id=request.user.pk, lines=incoming.validated_data["lines"]
            )
        except services.OrderValidationError as exc:
            return Response(exc.errors, status=status.HTTP_400_BAD_REQUEST)
        body = OrderSerializer(order).data
        location = reverse("order-detail", kwargs={"pk": str(order.pk)})
        return Response(body, status=status.HTTP_201_CREATED, headers={"Location": location})
