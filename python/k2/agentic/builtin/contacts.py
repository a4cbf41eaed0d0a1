"""Contacts and messaging: an address book and text messages to its entries."""

from __future__ import annotations

import re
from typing import Any

from k2.agentic.domain import Domain, assertion, register_domain
from k2.agentic.tools import ToolError, tool

MAX_MESSAGE_CHARS = 1000


def _phone(value: str) -> str:
    digits = re.sub(r"[\s\-().]", "", value)
    if not re.fullmatch(r"\+?\d{7,15}", digits):
        raise ToolError(f"{value!r} is not a phone number", "invalid_argument")
    return digits


@register_domain
class ContactsDomain(Domain):
    name = "contacts"
    policy = (
        "You manage the user's contacts and send text messages for them. Look contacts up "
        "before acting; if a name matches several contacts, ask which one. Never message a "
        "blocked contact. Read the message text back to the user before sending."
    )

    @classmethod
    def initial_state(cls) -> dict[str, Any]:
        return {
            "contacts": {
                "k1": {"name": "Alice Moreau", "phone": "+15550101", "email": "alice@example.com", "blocked": False},
                "k2": {"name": "Alice Chen", "phone": "+15550102", "email": "", "blocked": False},
                "k3": {"name": "Bruno Diaz", "phone": "+15550103", "email": "bruno@example.com", "blocked": False},
                "k4": {"name": "Spam Caller", "phone": "+15550999", "email": "", "blocked": True},
            },
            "messages": [
                {"id": "m1", "contact": "k3", "direction": "in", "text": "Are we still on for Friday?"},
            ],
            "next_contact": 5,
            "next_message": 2,
        }

    def _contact(self, contact_id: str) -> dict[str, Any]:
        found = self.state["contacts"].get(contact_id)
        if found is None:
            raise ToolError(f"no contact {contact_id}", "not_found")
        return found

    @tool(kind="read")
    def search_contacts(self, query: str) -> list[dict[str, Any]]:
        """Find contacts whose name, phone or email contains a text.

        Args:
            query: part of a name, number or email (case-insensitive).
        """
        q = query.lower().strip()
        if not q:
            raise ToolError("query must not be empty", "invalid_argument")
        return [
            {"id": cid, **c}
            for cid, c in sorted(self.state["contacts"].items())
            if q in c["name"].lower() or q in c["phone"] or q in c["email"].lower()
        ]

    @tool(kind="read")
    def get_contact(self, contact_id: str) -> dict[str, Any]:
        """One contact.

        Args:
            contact_id: e.g. k1.
        """
        return {"id": contact_id, **self._contact(contact_id)}

    @tool(kind="write")
    def add_contact(self, name: str, phone: str, email: str = "") -> dict[str, Any]:
        """Add a contact; the phone number must not belong to another contact.

        Args:
            name: full name.
            phone: phone number, e.g. +15550123.
            email: email address (optional).
        """
        if not name.strip():
            raise ToolError("name must not be empty", "invalid_argument")
        number = _phone(phone)
        for cid, c in self.state["contacts"].items():
            if c["phone"] == number:
                raise ToolError(f"{number} already belongs to {cid} ({c['name']})", "already_exists")
        cid = f"k{self.state['next_contact']}"
        self.state["next_contact"] += 1
        self.state["contacts"][cid] = {"name": name, "phone": number, "email": email, "blocked": False}
        return {"id": cid, **self.state["contacts"][cid]}

    @tool(kind="write")
    def update_contact(self, contact_id: str, phone: str | None = None, email: str | None = None) -> dict[str, Any]:
        """Change a contact's phone number and/or email.

        Args:
            contact_id: the contact.
            phone: the new phone number.
            email: the new email address.
        """
        contact = self._contact(contact_id)
        if phone is None and email is None:
            raise ToolError("give a new phone or email", "invalid_argument")
        if phone is not None:
            contact["phone"] = _phone(phone)
        if email is not None:
            if email and "@" not in email:
                raise ToolError(f"{email!r} is not an email address", "invalid_argument")
            contact["email"] = email
        return {"id": contact_id, **contact}

    @tool(kind="write")
    def delete_contact(self, contact_id: str) -> dict[str, Any]:
        """Delete a contact.

        Args:
            contact_id: the contact.
        """
        contact = self._contact(contact_id)
        del self.state["contacts"][contact_id]
        return {"deleted": contact_id, "name": contact["name"]}

    @tool(kind="write")
    def block_contact(self, contact_id: str) -> dict[str, Any]:
        """Block a contact: no messages to or from them.

        Args:
            contact_id: the contact.
        """
        contact = self._contact(contact_id)
        contact["blocked"] = True
        return {"id": contact_id, "blocked": True}

    @tool(kind="write")
    def send_message(self, contact_id: str, text: str) -> dict[str, Any]:
        """Send a text message to a contact.

        Args:
            contact_id: the recipient.
            text: the message (at most 1000 characters).
        """
        contact = self._contact(contact_id)
        if contact["blocked"]:
            raise ToolError(f"{contact_id} ({contact['name']}) is blocked", "blocked")
        if not text.strip():
            raise ToolError("the message is empty", "invalid_argument")
        if len(text) > MAX_MESSAGE_CHARS:
            raise ToolError(f"the message is {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}", "too_large")
        mid = f"m{self.state['next_message']}"
        self.state["next_message"] += 1
        self.state["messages"].append({"id": mid, "contact": contact_id, "direction": "out", "text": text})
        return {"id": mid, "to": contact["name"]}

    @tool(kind="read")
    def list_messages(self, contact_id: str) -> list[dict[str, Any]]:
        """The conversation with a contact, oldest first.

        Args:
            contact_id: the contact.
        """
        self._contact(contact_id)
        return [m for m in self.state["messages"] if m["contact"] == contact_id]

    @assertion
    def message_sent_containing(self, contact_id: str, text: str) -> bool:
        """Whether a message to the contact contains ``text``."""
        return any(m["contact"] == contact_id and m["direction"] == "out" and text in m["text"] for m in self.state["messages"])
