"""Tool evolution (k2.agentic.synth.evolve): valid, distinct, faithful variants (docs/synthesis.md)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from k2.agentic import domains, make_domain
from k2.agentic.synth.evolve import VariantPool, evolve_tools, held_out
from k2.agentic.synth.formats import get_format
from k2.agentic.synth.variant_domain import VariantDomain
from k2.errors import AgenticError

# One valid call of every base tool, written by hand against the base declarations.
SAMPLE_CALLS = {
    "bank": {
        "get_customer": {"customer_id": "c100"},
        "get_account": {"account_id": "acc-1001"},
        "list_transactions": {"account_id": "acc-1001", "limit": 5},
        "transfer": {"from_account": "acc-1002", "to_account": "acc-1001", "amount_cents": 12345, "memo": "rent"},
        "pay_bill": {"account_id": "acc-1001", "payee": "City Water", "amount_cents": 4550},
        "freeze_account": {"account_id": "acc-1001", "reason": "lost card"},
        "unfreeze_account": {"account_id": "acc-3001"},
    },
    "shop": {
        "find_customer": {"email": "ines@example.com"},
        "list_orders": {"customer_id": "u1"},
        "get_order": {"order_id": "o-501"},
        "get_product": {"sku": "kb-01"},
        "place_order": {"customer_id": "u2", "items": {"kb-01": 2, "cb-04": 1}},
        "cancel_order": {"order_id": "o-502"},
        "return_items": {"order_id": "o-501", "skus": ["kb-01", "cb-04"], "reason": "damaged"},
        "update_address": {"customer_id": "u1", "address": "9 Lake Dr"},
    },
    "calendar": {
        "list_events": {"date": "2025-03-10"},
        "get_event": {"event_id": "ev3"},
        "find_free_slot": {"date": "2025-03-10", "duration_minutes": 45, "earliest": "08:30", "latest": "17:00"},
        "create_event": {"title": "Yoga", "start": "2025-03-13 07:30", "end": "2025-03-13 08:15",
                         "attendees": ["kim@example.com", "lou@example.com"], "location": "Gym"},
        "move_event": {"event_id": "ev2", "start": "2025-03-14 16:00", "end": "2025-03-14 17:00"},
        "cancel_event": {"event_id": "ev1"},
        "add_attendee": {"event_id": "ev3", "email": "lou@example.com"},
    },
    "notes": {
        "list_files": {"folder": "/notes"},
        "read_file": {"path": "/notes/todo.txt"},
        "search_files": {"query": "ship"},
        "write_file": {"path": "/notes/todo.txt", "content": "hi\n", "overwrite": True},
        "append_to_file": {"path": "/notes/todo.txt", "text": "pay rent"},
        "move_file": {"source": "/notes/ideas.md", "destination": "/archive/ideas.md"},
        "delete_file": {"path": "/work/budget.csv"},
        "tag_file": {"path": "/notes/ideas.md", "tag": "review"},
    },
    "contacts": {
        "search_contacts": {"query": "alice"},
        "get_contact": {"contact_id": "k3"},
        "add_contact": {"name": "Nina Kim", "phone": "+15550777", "email": "nina@example.com"},
        "update_contact": {"contact_id": "k1", "phone": "+15550888", "email": None},
        "delete_contact": {"contact_id": "k2"},
        "block_contact": {"contact_id": "k3"},
        "send_message": {"contact_id": "k3", "text": "See you at 6"},
        "list_messages": {"contact_id": "k3"},
    },
    "device": {
        "get_settings": {},
        "set_toggle": {"setting": "bluetooth", "enabled": True},
        "set_level": {"setting": "volume", "value": 70},
        "scan_wifi": {},
        "connect_wifi": {"ssid": "CafeFree", "password": ""},
        "forget_wifi": {"ssid": "HomeNet"},
        "list_app_permissions": {"app": "maps"},
        "revoke_permission": {"app": "chat", "permission": "camera"},
    },
}


@pytest.fixture(scope="module")
def pool() -> VariantPool:
    return VariantPool(domains(), per_tool=15, seed=0, held_out_fraction=0.1)


def test_the_samples_cover_every_tool_and_succeed_on_the_base_domains() -> None:
    assert sorted(SAMPLE_CALLS) == sorted(domains())
    for name, calls in SAMPLE_CALLS.items():
        domain = make_domain(name)
        assert sorted(calls) == sorted(domain.tool_names()), name
        for tool, args in calls.items():
            assert make_domain(name).call(tool, args).ok, (name, tool)


def _check_specs(specs: list[dict]) -> None:
    assert len({json.dumps(s, sort_keys=True) for s in specs}) == len(specs)
    for spec in specs:
        jsonschema.Draft202012Validator.check_schema(spec["function"]["parameters"])
        name = spec["function"]["name"]
        assert 1 <= len(name) <= 64 and name.replace("_", "").replace("-", "").isalnum(), name


def test_distinct_specs_each_a_valid_json_schema(pool: VariantPool) -> None:
    specs = [v.spec for v in pool.variants.values()]
    assert len(specs) == 46 * 15
    _check_specs(specs)
    renamed = sum(v.name != v.base for v in pool.variants.values())
    reformatted = sum(any(p.format != "same" for p in v.params) for v in pool.variants.values())
    extended = sum(bool(v.extras) for v in pool.variants.values())
    assert renamed > 500 and reformatted > 100 and extended > 150


@pytest.mark.slow
def test_thousands_of_distinct_valid_specs_at_the_default_size() -> None:
    full = VariantPool(domains(), per_tool=60, seed=0)
    assert len(full.variants) == 2760
    _check_specs([v.spec for v in full.variants.values()])


def test_every_variant_call_reaches_the_base_calls_state_and_result(pool: VariantPool) -> None:
    for v in pool.variants.values():
        base_args = SAMPLE_CALLS[v.domain][v.base]
        reference = make_domain(v.domain)
        expected = reference.call(v.base, base_args)
        mapped = VariantDomain(v.domain, [v])
        args = v.from_base(base_args)
        assert jsonschema.Draft202012Validator(v.parameters).is_valid(args), (v.id, args)
        assert v.to_base(args) == base_args, v.id
        got = mapped.call(v.name, args)
        assert (got.ok, got.content) == (expected.ok, expected.content), v.id
        assert mapped.state_hash() == reference.state_hash(), v.id


def test_hand_written_variant_calls() -> None:
    """Calls written by hand in a variant's format equal the hand-converted base call."""
    money = get_format("dollars_string", "bank", "amount_cents")
    assert money.to_base("123.45", "amount") == 12345 and money.from_base(5, "amount") == "0.05"
    number = get_format("dollars_number", "bank", "amount_cents")
    assert number.to_base(15.5, "amount") == 1550
    ident = get_format("id_number", "bank", "from_account")
    assert ident.to_base(1002, "x") == "acc-1002" and ident.from_base("acc-1002", "x") == 1002
    assert get_format("dmy_time", "calendar", "start").to_base("13/03/2025 07:30", "start") == "2025-03-13 07:30"
    assert get_format("date_time_object", "calendar", "end").to_base({"date": "2025-03-13", "time": "08:15"}, "end") == "2025-03-13 08:15"
    assert get_format("minutes", "calendar", "earliest").to_base(510, "e") == "08:30"
    assert get_format("csv", "shop", "skus").to_base("kb-01, cb-04", "s") == ["kb-01", "cb-04"]
    assert get_format("sku_pairs", "shop", "items").to_base([{"sku": "kb-01", "quantity": 2}], "i") == {"kb-01": 2}
    assert get_format("on_off", "device", "enabled").to_base("off", "e") is False
    # A whole call: the first transfer variant that writes amounts as strings and ids as numbers.
    variants = evolve_tools("bank", 200, seed=3, tools=["transfer"])
    v = next(v for v in variants if {p.format for p in v.params} >= {"dollars_string", "id_number"})
    names = {p.base: p.name for p in v.params}
    call = {names["from_account"]: 1002, names["to_account"]: 1001, names["amount_cents"]: "123.45"}
    mapped, reference = VariantDomain("bank", [v]), make_domain("bank")
    assert mapped.call(v.name, call).ok
    reference.call("transfer", {"from_account": "acc-1002", "to_account": "acc-1001", "amount_cents": 12345})
    assert mapped.state_hash() == reference.state_hash()


def test_values_the_schema_lets_through_but_mean_nothing_are_tool_errors() -> None:
    v = next(v for v in evolve_tools("calendar", 200, seed=0, tools=["list_events"]) if v.params[0].format == "dmy")
    result = VariantDomain("calendar", [v]).call(v.name, {v.params[0].name: "31/02/2025"})
    assert not result.ok and result.code == "invalid_argument"
    result = VariantDomain("calendar", [v]).call(v.name, {v.params[0].name: "2025-03-10"})
    assert not result.ok and result.code == "invalid_arguments"  # the declared pattern refuses the base format


def test_evolution_is_a_function_of_the_seed() -> None:
    a = [v.to_json() for v in evolve_tools("shop", 20, seed=7)]
    b = [v.to_json() for v in evolve_tools("shop", 20, seed=7)]
    c = [v.to_json() for v in evolve_tools("shop", 20, seed=8)]
    assert a == b and a != c
    assert a[0]["spec"] == make_domain("shop").tool_specs()[0]  # v0 is the base tool itself


def test_held_out_split_is_by_id_and_stable(pool: VariantPool) -> None:
    held = [vid for vid in pool.variants if pool.is_held_out(vid)]
    assert 0.05 < len(held) / len(pool.variants) < 0.15
    assert not any(vid.endswith(".v0") for vid in held)
    by_rule = [vid for vid in pool.variants if held_out(vid, 0.1, 0)]
    assert set(by_rule) <= set(held) and len(held) - len(by_rule) <= 46
    for (domain, base), split in pool.by_tool.items():
        assert split["validation"], (domain, base)  # every tool has a held-out variant
        assert {v.id for v in split["validation"]} == {v.id for v in split["validation"] if pool.is_held_out(v.id)}
        assert not any(pool.is_held_out(v.id) for v in split["train"])


def test_bad_requests_are_clear_errors() -> None:
    with pytest.raises(AgenticError, match="no tool 'nope'"):
        evolve_tools("bank", 3, tools=["nope"])
    with pytest.raises(AgenticError, match="per_tool"):
        evolve_tools("bank", 0)
    v = evolve_tools("bank", 3, tools=["get_account"])[1]
    with pytest.raises(AgenticError, match="no parameter 'acount_id'"):
        v.from_base({"acount_id": "acc-1001"})


def test_environment_prompts_declare_each_agents_own_variants() -> None:
    from k2.agentic.env import AgentEnv
    from k2.agentic.tasks import example_tasks
    from k2.data.chat import render_chat

    task = next(t for t in example_tasks("bank") if t.id == "bank-move-savings")
    variants = evolve_tools("bank", 10, seed=0, tools=["transfer"])
    for v in variants[1:4]:
        domain = VariantDomain("bank", [v])
        env = AgentEnv(domain, domain.translate_task(task), seed=0)
        obs = env.reset()
        assert obs.text == render_chat(env.messages, [v.spec], add_generation_prompt=True)
        assert f'"name": "{v.name}"' in obs.text
