"""The built-in domains: tools, state, hashes, realistic errors, stochastic mode."""

from __future__ import annotations

import hashlib
import json

import pytest

from k2.agentic import domains, get_domain, make_domain
from k2.errors import AgenticError

from agentic_helpers import CounterDomain


def test_six_builtin_domains_with_5_to_12_tools_of_both_kinds() -> None:
    names = domains()
    assert {"notes", "calendar", "bank", "shop", "contacts", "device"} <= set(names)
    for name in names:
        d = make_domain(name)
        kinds = [d.tool_kind(t) for t in d.tool_names()]
        assert 5 <= len(kinds) <= 12, name
        assert "read" in kinds and "write" in kinds, name
        assert d.policy and d.name == name
        json.dumps(d.get_state())


def test_state_hash_is_sha256_of_canonical_json() -> None:
    d = make_domain("bank")
    expected = hashlib.sha256(
        json.dumps(d.get_state(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    assert d.state_hash() == expected
    shuffled = dict(reversed(list(d.get_state().items())))
    assert make_domain("bank").fresh(shuffled).state_hash() == expected


def test_get_and_set_state_copy() -> None:
    d = make_domain("notes")
    state = d.get_state()
    state["files"].clear()
    assert d.state["files"]  # get_state handed out a copy
    d.set_state(state)
    assert d.call("list_files", {}).content == "[]"
    with pytest.raises(AgenticError, match="JSON"):
        d.set_state({"x": {1, 2}})


@pytest.mark.parametrize(
    "domain, tool, args, code",
    [
        ("bank", "transfer", {"from_account": "acc-2001", "to_account": "acc-1001", "amount_cents": 9000}, "insufficient_funds"),
        ("bank", "transfer", {"from_account": "acc-1001", "to_account": "acc-3001", "amount_cents": 100}, "currency_mismatch"),
        ("bank", "pay_bill", {"account_id": "acc-3001", "payee": "X", "amount_cents": 100}, "account_frozen"),
        ("bank", "get_account", {"account_id": "acc-9"}, "not_found"),
        ("calendar", "create_event", {"title": "x", "start": "2025-03-10 14:30", "end": "2025-03-10 15:30"}, "conflict"),
        ("calendar", "create_event", {"title": "x", "start": "2025-03-10 16:00", "end": "2025-03-10 15:00"}, "invalid_argument"),
        ("calendar", "move_event", {"event_id": "ev9", "start": "2025-03-10 16:00", "end": "2025-03-10 17:00"}, "not_found"),
        ("shop", "cancel_order", {"order_id": "o-501"}, "invalid_state"),
        ("shop", "place_order", {"customer_id": "u1", "items": {"ms-02": 1}}, "out_of_stock"),
        ("shop", "return_items", {"order_id": "o-501", "skus": ["hd-03"], "reason": "x"}, "not_found"),
        ("contacts", "send_message", {"contact_id": "k4", "text": "hi"}, "blocked"),
        ("contacts", "add_contact", {"name": "Dup", "phone": "+1 555 0101"}, "already_exists"),
        ("device", "connect_wifi", {"ssid": "Office5G", "password": "x"}, "not_found"),
        ("notes", "write_file", {"path": "/notes/todo.txt", "content": "x"}, "already_exists"),
        ("notes", "read_file", {"path": "relative.txt"}, "invalid_path"),
    ],
)
def test_realistic_errors_leave_the_state_alone(domain, tool, args, code) -> None:
    d = make_domain(domain)
    before = d.state_hash()
    result = d.call(tool, args)
    assert not result.ok and result.code == code, result
    assert d.state_hash() == before


def test_writes_change_state_and_reads_do_not() -> None:
    d = make_domain("bank")
    before = d.state_hash()
    assert d.call("get_account", {"account_id": "acc-1001"}).ok
    assert d.state_hash() == before
    result = d.call("transfer", {"from_account": "acc-1001", "to_account": "acc-2001", "amount_cents": 1000})
    assert result.ok and json.loads(result.content)["from_balance_cents"] == 253_000
    assert d.state["accounts"]["acc-2001"]["balance_cents"] == 9_000
    device = make_domain("device")
    assert device.call("set_toggle", {"setting": "airplane_mode", "enabled": True}).ok
    assert device.call("set_toggle", {"setting": "wifi", "enabled": True}).code == "invalid_state"
    assert device.state["connected"] is None


def test_stochastic_mode_is_seeded_and_changes_nothing_when_it_fails() -> None:
    def run(seed):
        d = make_domain("shop", stochastic=True, failure_rate=0.5, seed=seed)
        out = []
        for _ in range(40):
            before = d.state_hash()
            r = d.call("get_product", {"sku": "kb-01"})
            if r.transient:
                assert d.state_hash() == before and json.loads(r.content)["error"]["retryable"] is True
            out.append(r.transient)
        return out

    a = run(3)
    assert a == run(3) and a != run(4)
    assert 5 < sum(a) < 35
    assert not any(make_domain("shop").call("get_product", {"sku": "kb-01"}).transient for _ in range(20))


def test_user_domains_and_module_class_specs() -> None:
    assert get_domain(CounterDomain) is CounterDomain
    assert get_domain(CounterDomain()) is CounterDomain
    assert get_domain("k2.agentic.builtin.bank:BankDomain").name == "bank"
    with pytest.raises(AgenticError, match="unknown domain 'nope'"):
        get_domain("nope")
    with pytest.raises(AgenticError, match="cannot import"):
        get_domain("no.such.module:X")
