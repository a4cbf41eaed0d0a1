"""The built-in domains (docs/agentic.md): importing this package registers them."""

from k2.agentic.builtin.bank import BankDomain
from k2.agentic.builtin.calendar import CalendarDomain
from k2.agentic.builtin.contacts import ContactsDomain
from k2.agentic.builtin.device import DeviceDomain
from k2.agentic.builtin.notes import NotesDomain
from k2.agentic.builtin.shop import ShopDomain

__all__ = ["BankDomain", "CalendarDomain", "ContactsDomain", "DeviceDomain", "NotesDomain", "ShopDomain"]
