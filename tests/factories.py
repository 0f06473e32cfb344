"""Factories for users and stocked catalog items, built through the services
so that every row comes with its events."""

from __future__ import annotations

from decimal import Decimal

import factory
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from inventory import services as inventory_services
from inventory.models import StockItem


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"customer{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.PostGenerationMethodCall("set_password", "pw-for-tests-only")

    @factory.post_generation
    def save_password(self, create: bool, extracted: object, **kwargs: object) -> None:
        if create:
            self.save()


def stock_item(
    sku: str = "SKU-1", *, on_hand: int = 10, price: str = "5.00", threshold: int = 0
) -> StockItem:
    return inventory_services.item_add(
        sku=sku,
        name=f"Item {sku}",
        unit_price=Decimal(price),
        on_hand=on_hand,
        low_stock_threshold=threshold,
    )


def api_client_for(user: object) -> APIClient:
    client = APIClient()
    client.force_authenticate(user=user)  # type: ignore[arg-type]
    return client
