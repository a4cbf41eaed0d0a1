"""Bank: accounts, balances in cents, transfers and bill payments."""

from __future__ import annotations

from typing import Any

from k2.agentic.domain import Domain, assertion, register_domain
from k2.agentic.tools import ToolError, tool

DAILY_LIMIT_CENTS = 500_000


@register_domain
class BankDomain(Domain):
    name = "bank"
    policy = (
        "You are a bank's support agent. Identify the customer by customer id before touching "
        "an account, and act only on that customer's accounts. Amounts are in cents. Transfers "
        "over 5000.00 a day are refused. A frozen account can receive but not send money. Confirm "
        "the amount and the accounts before any transfer or payment."
    )

    @classmethod
    def initial_state(cls) -> dict[str, Any]:
        return {
            "customers": {
                "c100": {"name": "Mia Li", "accounts": ["acc-1001", "acc-1002"]},
                "c200": {"name": "Omar Haddad", "accounts": ["acc-2001"]},
                "c300": {"name": "Lena Ruiz", "accounts": ["acc-3001"]},
            },
            "accounts": {
                "acc-1001": {"owner": "c100", "kind": "checking", "balance_cents": 254_000, "currency": "USD", "frozen": False, "sent_today_cents": 0},
                "acc-1002": {"owner": "c100", "kind": "savings", "balance_cents": 1_200_000, "currency": "USD", "frozen": False, "sent_today_cents": 0},
                "acc-2001": {"owner": "c200", "kind": "checking", "balance_cents": 8_000, "currency": "USD", "frozen": False, "sent_today_cents": 0},
                "acc-3001": {"owner": "c300", "kind": "checking", "balance_cents": 73_000, "currency": "EUR", "frozen": True, "sent_today_cents": 0},
            },
            "transactions": [
                {"id": "t1", "account": "acc-1001", "amount_cents": -4_599, "memo": "Grocer", "counterparty": "merchant"},
                {"id": "t2", "account": "acc-1001", "amount_cents": 300_000, "memo": "Salary", "counterparty": "employer"},
            ],
            "next_txn": 3,
        }

    def _account(self, account_id: str) -> dict[str, Any]:
        found = self.state["accounts"].get(account_id)
        if found is None:
            raise ToolError(f"no account {account_id}", "not_found")
        return found

    def _record(self, account: str, amount: int, memo: str, counterparty: str) -> str:
        txn = f"t{self.state['next_txn']}"
        self.state["next_txn"] += 1
        self.state["transactions"].append(
            {"id": txn, "account": account, "amount_cents": amount, "memo": memo, "counterparty": counterparty}
        )
        return txn

    def _debit_check(self, account_id: str, amount_cents: int) -> dict[str, Any]:
        account = self._account(account_id)
        if amount_cents <= 0:
            raise ToolError("amount_cents must be positive", "invalid_argument")
        if account["frozen"]:
            raise ToolError(f"{account_id} is frozen and cannot send money", "account_frozen")
        if account["balance_cents"] < amount_cents:
            raise ToolError(
                f"insufficient funds: {account_id} holds {account['balance_cents']} cents, {amount_cents} needed",
                "insufficient_funds",
            )
        if account["sent_today_cents"] + amount_cents > DAILY_LIMIT_CENTS:
            raise ToolError(f"this would exceed the daily limit of {DAILY_LIMIT_CENTS} cents", "limit_exceeded")
        return account

    @tool(kind="read")
    def get_customer(self, customer_id: str) -> dict[str, Any]:
        """Look up a customer and their account ids.

        Args:
            customer_id: e.g. c100.
        """
        found = self.state["customers"].get(customer_id)
        if found is None:
            raise ToolError(f"no customer {customer_id}", "not_found")
        return {"id": customer_id, **found}

    @tool(kind="read")
    def get_account(self, account_id: str) -> dict[str, Any]:
        """An account's kind, balance (cents), currency and whether it is frozen.

        Args:
            account_id: e.g. acc-1001.
        """
        account = self._account(account_id)
        return {"id": account_id, **account}

    @tool(kind="read")
    def list_transactions(self, account_id: str, limit: int = 10) -> list[dict[str, Any]]:
        """The most recent transactions of an account, newest first.

        Args:
            account_id: the account.
            limit: at most this many (1-50).
        """
        self._account(account_id)
        if not 1 <= limit <= 50:
            raise ToolError("limit must be between 1 and 50", "invalid_argument")
        rows = [t for t in self.state["transactions"] if t["account"] == account_id]
        return rows[::-1][:limit]

    @tool(kind="write")
    def transfer(self, from_account: str, to_account: str, amount_cents: int, memo: str = "") -> dict[str, Any]:
        """Move money between two accounts of the same currency.

        Args:
            from_account: the paying account.
            to_account: the receiving account.
            amount_cents: how much, in cents.
            memo: a note shown on both statements.
        """
        if from_account == to_account:
            raise ToolError("cannot transfer to the same account", "invalid_argument")
        source = self._debit_check(from_account, amount_cents)
        target = self._account(to_account)
        if source["currency"] != target["currency"]:
            raise ToolError(
                f"{from_account} is in {source['currency']} but {to_account} is in {target['currency']}",
                "currency_mismatch",
            )
        source["balance_cents"] -= amount_cents
        source["sent_today_cents"] += amount_cents
        target["balance_cents"] += amount_cents
        txn = self._record(from_account, -amount_cents, memo, to_account)
        self._record(to_account, amount_cents, memo, from_account)
        return {"transaction": txn, "from_balance_cents": source["balance_cents"]}

    @tool(kind="write")
    def pay_bill(self, account_id: str, payee: str, amount_cents: int) -> dict[str, Any]:
        """Pay a bill to an outside payee.

        Args:
            account_id: the paying account.
            payee: who is paid, e.g. City Water.
            amount_cents: how much, in cents.
        """
        if not payee.strip():
            raise ToolError("payee must not be empty", "invalid_argument")
        account = self._debit_check(account_id, amount_cents)
        account["balance_cents"] -= amount_cents
        account["sent_today_cents"] += amount_cents
        txn = self._record(account_id, -amount_cents, f"bill: {payee}", payee)
        return {"transaction": txn, "balance_cents": account["balance_cents"]}

    @tool(kind="write")
    def freeze_account(self, account_id: str, reason: str) -> dict[str, Any]:
        """Freeze an account (it can no longer send money), e.g. for a lost card.

        Args:
            account_id: the account.
            reason: why, for the record.
        """
        account = self._account(account_id)
        if account["frozen"]:
            raise ToolError(f"{account_id} is already frozen", "already_frozen")
        account["frozen"] = True
        account["freeze_reason"] = reason
        return {"id": account_id, "frozen": True}

    @tool(kind="write")
    def unfreeze_account(self, account_id: str) -> dict[str, Any]:
        """Lift a freeze.

        Args:
            account_id: the account.
        """
        account = self._account(account_id)
        if not account["frozen"]:
            raise ToolError(f"{account_id} is not frozen", "not_frozen")
        account["frozen"] = False
        account.pop("freeze_reason", None)
        return {"id": account_id, "frozen": False}

    @assertion
    def balance_is(self, account_id: str, balance_cents: int) -> bool:
        """Whether the account holds exactly this balance."""
        return self.state["accounts"].get(account_id, {}).get("balance_cents") == balance_cents
