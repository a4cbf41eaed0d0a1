"""Shop: products with stock, customers, orders, cancellations and returns."""

from __future__ import annotations

from typing import Any

from k2.agentic.domain import Domain, assertion, register_domain
from k2.agentic.tools import ToolError, tool


@register_domain
class ShopDomain(Domain):
    name = "shop"
    policy = (
        "You are an online shop's support agent. Find the customer by email first and act only "
        "on their orders. An order can be cancelled only while 'placed'; items can be returned "
        "only from a 'delivered' order. Refunds go to the original payment. Confirm before "
        "placing, cancelling or returning."
    )

    @classmethod
    def initial_state(cls) -> dict[str, Any]:
        return {
            "products": {
                "kb-01": {"name": "Mechanical keyboard", "price_cents": 8_900, "stock": 12},
                "ms-02": {"name": "Wireless mouse", "price_cents": 2_500, "stock": 0},
                "hd-03": {"name": "Noise-cancelling headphones", "price_cents": 19_900, "stock": 4},
                "cb-04": {"name": "USB-C cable", "price_cents": 900, "stock": 150},
            },
            "customers": {
                "u1": {"name": "Ines Park", "email": "ines@example.com", "address": "12 Elm St"},
                "u2": {"name": "Tom Berg", "email": "tom@example.com", "address": "3 Oak Ave"},
            },
            "orders": {
                "o-501": {"customer": "u1", "items": {"kb-01": 1, "cb-04": 2}, "status": "delivered", "total_cents": 10_700, "refunded_cents": 0},
                "o-502": {"customer": "u1", "items": {"hd-03": 1}, "status": "placed", "total_cents": 19_900, "refunded_cents": 0},
                "o-503": {"customer": "u2", "items": {"cb-04": 3}, "status": "shipped", "total_cents": 2_700, "refunded_cents": 0},
            },
            "next_order": 504,
        }

    def _order(self, order_id: str) -> dict[str, Any]:
        found = self.state["orders"].get(order_id)
        if found is None:
            raise ToolError(f"no order {order_id}", "not_found")
        return found

    def _product(self, sku: str) -> dict[str, Any]:
        found = self.state["products"].get(sku)
        if found is None:
            raise ToolError(f"no product {sku}", "not_found")
        return found

    @tool(kind="read")
    def find_customer(self, email: str) -> dict[str, Any]:
        """Find a customer by email address.

        Args:
            email: their email address.
        """
        for cid, customer in sorted(self.state["customers"].items()):
            if customer["email"].lower() == email.lower():
                return {"id": cid, **customer}
        raise ToolError(f"no customer with email {email}", "not_found")

    @tool(kind="read")
    def list_orders(self, customer_id: str) -> list[dict[str, Any]]:
        """A customer's orders.

        Args:
            customer_id: e.g. u1.
        """
        if customer_id not in self.state["customers"]:
            raise ToolError(f"no customer {customer_id}", "not_found")
        return [{"id": oid, **o} for oid, o in sorted(self.state["orders"].items()) if o["customer"] == customer_id]

    @tool(kind="read")
    def get_order(self, order_id: str) -> dict[str, Any]:
        """One order: items (sku -> quantity), status, total and refunds.

        Args:
            order_id: e.g. o-501.
        """
        return {"id": order_id, **self._order(order_id)}

    @tool(kind="read")
    def get_product(self, sku: str) -> dict[str, Any]:
        """A product's name, price (cents) and stock.

        Args:
            sku: the product code, e.g. kb-01.
        """
        return {"sku": sku, **self._product(sku)}

    @tool(kind="write")
    def place_order(self, customer_id: str, items: dict[str, int]) -> dict[str, Any]:
        """Place an order; every item must be in stock.

        Args:
            customer_id: who orders.
            items: product sku -> quantity.
        """
        if customer_id not in self.state["customers"]:
            raise ToolError(f"no customer {customer_id}", "not_found")
        if not items:
            raise ToolError("an order needs at least one item", "invalid_argument")
        total = 0
        for sku, qty in sorted(items.items()):
            product = self._product(sku)
            if qty <= 0:
                raise ToolError(f"quantity of {sku} must be positive", "invalid_argument")
            if product["stock"] < qty:
                raise ToolError(f"{sku} has {product['stock']} in stock, {qty} requested", "out_of_stock")
            total += product["price_cents"] * qty
        for sku, qty in items.items():
            self.state["products"][sku]["stock"] -= qty
        order_id = f"o-{self.state['next_order']}"
        self.state["next_order"] += 1
        self.state["orders"][order_id] = {
            "customer": customer_id, "items": dict(sorted(items.items())), "status": "placed",
            "total_cents": total, "refunded_cents": 0,
        }
        return {"id": order_id, "total_cents": total}

    @tool(kind="write")
    def cancel_order(self, order_id: str) -> dict[str, Any]:
        """Cancel an order that has not shipped; its stock is restored and it is refunded in full.

        Args:
            order_id: the order.
        """
        order = self._order(order_id)
        if order["status"] != "placed":
            raise ToolError(f"{order_id} is {order['status']}; only placed orders can be cancelled", "invalid_state")
        for sku, qty in order["items"].items():
            self.state["products"][sku]["stock"] += qty
        order["status"] = "cancelled"
        order["refunded_cents"] = order["total_cents"]
        return {"id": order_id, "status": "cancelled", "refunded_cents": order["total_cents"]}

    @tool(kind="write")
    def return_items(self, order_id: str, skus: list[str], reason: str) -> dict[str, Any]:
        """Return items of a delivered order (each listed sku is returned in full) for a refund.

        Args:
            order_id: the order.
            skus: the product codes to return.
            reason: why, e.g. damaged.
        """
        order = self._order(order_id)
        if order["status"] not in ("delivered", "partially_returned"):
            raise ToolError(f"{order_id} is {order['status']}; only delivered orders accept returns", "invalid_state")
        if not skus:
            raise ToolError("name at least one sku to return", "invalid_argument")
        refund = 0
        for sku in skus:
            if sku not in order["items"]:
                raise ToolError(f"{sku} is not in {order_id}", "not_found")
        for sku in sorted(set(skus)):
            qty = order["items"].pop(sku)
            refund += self.state["products"][sku]["price_cents"] * qty
            self.state["products"][sku]["stock"] += qty
        order["refunded_cents"] += refund
        order["status"] = "returned" if not order["items"] else "partially_returned"
        order["return_reason"] = reason
        return {"id": order_id, "refunded_cents": refund, "status": order["status"]}

    @tool(kind="write")
    def update_address(self, customer_id: str, address: str) -> dict[str, Any]:
        """Change a customer's shipping address.

        Args:
            customer_id: the customer.
            address: the new address.
        """
        customer = self.state["customers"].get(customer_id)
        if customer is None:
            raise ToolError(f"no customer {customer_id}", "not_found")
        if len(address.strip()) < 5:
            raise ToolError("address is too short", "invalid_argument")
        customer["address"] = address
        return {"id": customer_id, "address": address}

    @assertion
    def order_status_is(self, order_id: str, status: str) -> bool:
        """Whether the order has this status."""
        return self.state["orders"].get(order_id, {}).get("status") == status
