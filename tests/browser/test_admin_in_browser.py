"""What operators and customers click, in a real browser (issue 8)."""

from __future__ import annotations

from typing import Any

import pytest

from eventing.models import DeadLetter, StoredEvent
from orders.models import CatalogItem, Order

from ..factories import UserFactory, api_client_for, stock_item
from ..support import Worker, wait_for
from .conftest import login_admin

pytestmark = [pytest.mark.live, pytest.mark.browser]

PASSWORD = "pw-for-tests-only"  # tests.factories.UserFactory's


def _staff() -> Any:
    return UserFactory(username="operator", is_staff=True, is_superuser=True)


def _place(customer: Any, sku: str, quantity: int = 1) -> str:
    response = api_client_for(customer).post(
        "/api/orders/", {"lines": [{"sku": sku, "quantity": quantity}]}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()["id"]


def test_staff_sees_an_orders_timeline_and_follows_causation(
    live: Worker, web_server: str, page: Any
) -> None:
    stock_item("SKU-B1", on_hand=5)
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-B1").exists(), what="catalog")
    order_id = _place(UserFactory(), "SKU-B1")
    wait_for(
        lambda: Order.objects.filter(pk=order_id, status="CONFIRMED").exists(),
        what="the order to be confirmed",
    )
    _staff()

    login_admin(page, web_server, "operator", PASSWORD)
    page.goto(f"{web_server}/admin/orders/order/{order_id}/change/")
    timeline = page.locator("table.event-timeline")
    for event_type in ("orders.OrderPlaced", "inventory.StockReserved", "orders.OrderConfirmed"):
        assert timeline.get_by_text(event_type, exact=True).count() == 1
    page.shot("order-timeline")

    timeline.get_by_text("orders.OrderPlaced", exact=True).click()
    placed = StoredEvent.objects.get(aggregate_id=order_id, event_type="orders.OrderPlaced")
    page.wait_for_load_state()
    page.shot("order-placed")
    assert page.url.endswith(f"/admin/eventing/storedevent/{placed.pk}/change/"), page.url
    page.get_by_role("link", name="1 event(s)").click()  # what OrderPlaced caused, for inventory
    page.wait_for_load_state()
    page.shot("caused-events")
    page.locator("#result_list").get_by_role("link", name="inventory.StockReserved").click()
    reserved = StoredEvent.objects.get(aggregate_id=order_id, event_type="inventory.StockReserved")
    # The admin keeps the list's search in the query string.
    page.wait_for_url(f"**/admin/eventing/storedevent/{reserved.pk}/change/**")
    assert str(placed) in page.locator(".field-causation_link").inner_text()
    page.shot("stock-reserved-with-causation")
    assert page.console_errors == []


def test_staff_redrives_a_dead_letter_from_the_admin(
    live: Worker, web_server: str, page: Any
) -> None:
    stock_item("SKU-B2", on_hand=5)
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-B2").exists(), what="catalog")
    live.restart(EVENTING_FAIL_CONSUMER="inventory")  # the test-only failure switch
    order_id = _place(UserFactory(), "SKU-B2")
    dead = wait_for(
        lambda: DeadLetter.objects.filter(consumer="inventory", status="open").first(),
        what="the dead letter",
    )
    _staff()

    login_admin(page, web_server, "operator", PASSWORD)
    page.goto(f"{web_server}/admin/eventing/deadletter/{dead.pk}/change/")
    assert "EVENTING_FAIL_CONSUMER=inventory" in page.locator(".field-error").inner_text()
    assert "Traceback" in page.locator("pre.traceback").inner_text()
    page.shot("dead-letter")

    live.restart()  # the switch is off again: the "fix" is deployed
    page.goto(f"{web_server}/admin/eventing/deadletter/")
    page.check(f"input[name=_selected_action][value='{dead.pk}']")
    page.select_option("select[name=action]", "redrive_selected")
    page.click("button[name=index]")
    assert "Redrove 1 dead letter(s)." in page.locator("ul.messagelist").inner_text()

    wait_for(
        lambda: Order.objects.filter(pk=order_id, status="CONFIRMED").exists(),
        what="the redriven order to be confirmed",
    )
    page.goto(f"{web_server}/admin/orders/order/{order_id}/change/")
    assert "Confirmed" in page.locator(".field-status").inner_text()
    page.shot("order-confirmed-after-redrive")
    assert page.console_errors == []


def test_customer_sees_only_their_own_orders_in_the_browsable_api(
    live: Worker, web_server: str, page: Any
) -> None:
    stock_item("SKU-B3", on_hand=5)
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-B3").exists(), what="catalog")
    alice, bob = UserFactory(username="alice-b"), UserFactory(username="bob-b")
    mine, theirs = _place(alice, "SKU-B3"), _place(bob, "SKU-B3")
    wait_for(lambda: Order.objects.filter(status="CONFIRMED").count() == 2, what="both confirmed")

    page.goto(f"{web_server}/api-auth/login/?next=/api/orders/")
    page.fill("#id_username", "alice-b")
    page.fill("#id_password", PASSWORD)
    page.click("[type=submit]")
    page.wait_for_url(f"{web_server}/api/orders/")
    wait_for(
        lambda: (page.reload(), mine in page.content())[1],
        what="alice's order in her list",
    )
    assert theirs not in page.content()
    page.shot("customer-orders")
    assert page.console_errors == []
    page.expect_http_errors = True  # the 404 below is the point
    page.goto(f"{web_server}/api/orders/{theirs}/")
    assert "Not found" in page.content()


def test_staff_dashboard_draws_the_flow_graph_and_charts_without_js_errors(
    live: Worker, web_server: str, page: Any
) -> None:
    stock_item("SKU-B4", on_hand=5)
    wait_for(lambda: CatalogItem.objects.filter(sku="SKU-B4").exists(), what="catalog")
    customer = UserFactory()
    for _ in range(3):
        _place(customer, "SKU-B4")
    wait_for(lambda: Order.objects.filter(status="CONFIRMED").count() == 3, what="three confirmed")
    _staff()

    login_admin(page, web_server, "operator", PASSWORD)
    page.click("#eventing-dashboard-link a")
    page.wait_for_selector("#throughput-chart svg path.ev-line")
    graph = page.locator("#flow-graph svg")
    for label in ("orders.OrderPlaced", "inventory.StockReserved", "notifications"):
        assert graph.get_by_text(label).count() >= 1
    assert page.locator("#throughput-chart svg path.ev-line").count() >= 1
    assert page.locator("#lag-chart svg").count() == 1
    # The throughput chart has data: the events this test appended.
    assert int(page.locator("#throughput-chart").get_attribute("data-total") or 0) >= 12
    page.shot("dashboard")
    assert page.console_errors == []
