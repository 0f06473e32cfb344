"""Demo data: a staff user, two customers and a stocked catalog. Safe to rerun."""

from __future__ import annotations

import os
import secrets
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from inventory import services
from inventory.models import StockItem

CATALOG = [
    ("SKU-APPLE", "Apple", Decimal("0.50"), 500, 20),
    ("SKU-BREAD", "Bread", Decimal("2.40"), 120, 10),
    ("SKU-COFFEE", "Coffee beans 1kg", Decimal("18.00"), 60, 5),
    ("SKU-MUG", "Mug", Decimal("7.90"), 30, 5),
    ("SKU-TEAPOT", "Teapot", Decimal("34.00"), 5, 2),
]

USERS = [
    ("staff", "staff@example.com", True),
    ("alice", "alice@example.com", False),
    ("bob", "bob@example.com", False),
]


class Command(BaseCommand):
    help = (
        "Create demo users (staff, alice, bob) and a stocked catalog. Passwords come from "
        "DEMO_PASSWORD (make run writes one into .env); rerunning resets the demo users' "
        "passwords to it and adds missing catalog items, leaving existing stock as it is."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        password = os.environ.get("DEMO_PASSWORD") or secrets.token_urlsafe(9)
        user_model = get_user_model()
        for username, email, is_staff in USERS:
            user, _created = user_model.objects.get_or_create(
                username=username,
                defaults={"email": email, "is_staff": is_staff, "is_superuser": is_staff},
            )
            user.set_password(password)
            user.save(update_fields=["password"])
            role = "staff (admin)" if is_staff else "customer"
            self.stdout.write(f"  {role:14} user {username!r} password {password!r}")
        added = 0
        for sku, name, price, on_hand, threshold in CATALOG:
            if not StockItem.objects.filter(sku=sku).exists():
                services.item_add(
                    sku=sku,
                    name=name,
                    unit_price=price,
                    on_hand=on_hand,
                    low_stock_threshold=threshold,
                )
                added += 1
        self.stdout.write(
            self.style.SUCCESS(f"Catalog: {added} item(s) added, {len(CATALOG)} in all.")
        )
