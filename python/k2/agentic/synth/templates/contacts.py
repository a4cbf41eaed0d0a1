"""Contacts task templates (docs/synthesis.md)."""

from __future__ import annotations

from k2.agentic.synth.plan import Call, Ctx, Draft, Secret, ask, calls, confirm, say
from k2.agentic.synth.templates import template

FACTS = {"your name|who": "I'm Jo."}
FIRST = ("Nina", "Omar", "Priya", "Lukas", "Sofia", "Chen", "Ana", "Ravi")
LAST = ("Smith", "Okafor", "Novak", "Silva", "Kim", "Haddad", "Rossi")
TEXTS = ("Running 10 minutes late", "See you at 6", "Happy birthday!", "Can you call me back", "Dinner on Friday works")


def _number(ctx: Ctx) -> str:
    return "+1555" + str(ctx.rng.randrange(200_000, 999_999))


@template("contacts", "single", info=True)
def lookup(ctx: Ctx) -> Draft:
    cid = ctx.rng.choice(("k1", "k3"))
    person = ctx.state["contacts"][cid]
    call = Call("g", "get_contact", {"contact_id": cid})
    got = ctx.run(call)
    return Draft(
        opening=f"What's the phone number of contact {cid}?",
        vague="What's the phone number of one of my contacts?",
        secrets=[Secret("contact id", f"The contact id is {cid}.", (cid,))],
        steps=[calls(call), say(lambda r: f"{person['name']}'s number is {r['g']['phone']}.")],
        communicate=[got["phone"]], known_info="You are Jo.", facts=FACTS,
    )


@template("contacts", "single")
def last_message(ctx: Ctx) -> Draft:
    ctx.override({"messages": [{"id": "m1", "contact": "k3", "direction": "in", "text": ctx.rng.choice(TEXTS)}]})
    call = Call("m", "list_messages", {"contact_id": "k3"})
    got = ctx.run(call)
    return Draft(
        opening="What did Bruno Diaz (contact k3) last text me?",
        steps=[calls(call), say(lambda r: f"Bruno's last message was: \"{r['m'][-1]['text']}\"")],
        communicate=[got[-1]["text"]], known_info="You are Jo.", facts=FACTS,
    )


@template("contacts", "multi")
def message_bruno(ctx: Ctx) -> Draft:
    text = ctx.rng.choice(TEXTS)
    find = Call("s", "search_contacts", {"query": "Bruno"})
    send = Call("x", "send_message", {"contact_id": "k3", "text": text})
    ctx.run(find)
    ctx.run(send)
    return Draft(
        opening=f"Text Bruno: '{text}'.",
        steps=[calls(find), confirm(f"I'll send Bruno Diaz: \"{text}\". Shall I go ahead?"), calls(send), say("Sent to Bruno Diaz.")],
        communicate=["Bruno Diaz"], known_info="You are Jo.", facts=FACTS,
    )


@template("contacts", "single", info=True)
def add(ctx: Ctx) -> Draft:
    name = f"{ctx.rng.choice(FIRST)} {ctx.rng.choice(LAST)}"
    phone = _number(ctx)
    call = Call("a", "add_contact", {"name": name, "phone": phone})
    ctx.run(call)
    return Draft(
        opening=f"Add {name} to my contacts, number {phone}.",
        vague=f"Add {name} to my contacts, please.",
        secrets=[Secret("phone number", f"The number is {phone}.", (phone,))],
        steps=[confirm(f"I'll add {name} with {phone}. Shall I go ahead?"), calls(call), say(lambda r: f"{name} is saved as contact {r['a']['id']}.")],
        communicate=[name], known_info="You are Jo.", facts=FACTS,
    )


@template("contacts", "multi")
def which_alice(ctx: Ctx) -> Draft:
    cid = ctx.rng.choice(("k1", "k2"))
    who = ctx.state["contacts"][cid]["name"]
    text = ctx.rng.choice(TEXTS)
    find = Call("s", "search_contacts", {"query": "Alice"})
    send = Call("x", "send_message", {"contact_id": cid, "text": text})
    ctx.run(find)
    ctx.run(send)
    return Draft(
        opening=f"Send Alice the text '{text}'.",
        facts={**FACTS, "which one|which alice": f"I mean {who}."},
        steps=[calls(find), ask("I found Alice Moreau and Alice Chen. Which one do you mean?", who),
               confirm(f"I'll send {who}: \"{text}\". Shall I go ahead?"), calls(send), say(f"Sent to {who}.")],
        communicate=[who], known_info=f"You are Jo. You mean {who}.",
    )


@template("contacts", "parallel")
def two_numbers(ctx: Ctx) -> Draft:
    reads = [Call("a", "get_contact", {"contact_id": "k1"}), Call("b", "get_contact", {"contact_id": "k3"})]
    got = [ctx.run(c) for c in reads]
    return Draft(
        opening="Give me the numbers of contacts k1 and k3.",
        steps=[calls(*reads), say(lambda r: f"{r['a']['name']}: {r['a']['phone']}; {r['b']['name']}: {r['b']['phone']}.")],
        communicate=[g["phone"] for g in got], known_info="You are Jo.", facts=FACTS,
    )


@template("contacts", "error")
def duplicate_number(ctx: Ctx) -> Draft:
    email = f"bruno.{ctx.rng.choice(LAST).lower()}@example.com"
    first = Call("fail", "add_contact", {"name": "Bruno Diaz", "phone": "+15550103", "email": email}, "already_exists")
    fix = Call("u", "update_contact", {"contact_id": "k3", "email": email})
    ctx.run(first)
    ctx.run(fix)
    return Draft(
        opening=f"Add Bruno Diaz, +15550103, email {email}.",
        steps=[calls(first), confirm(f"That number already belongs to Bruno Diaz (k3). Shall I set his email to {email} instead?"),
               calls(fix), say(f"Bruno Diaz's email is now {email}.")],
        communicate=[email], known_info="You are Jo.", facts=FACTS,
    )


@template("contacts", "impossible")
def blocked(ctx: Ctx) -> Draft:
    find = Call("s", "search_contacts", {"query": "Spam"})
    ctx.run(find)
    return Draft(
        opening=f"Text the Spam Caller: '{ctx.rng.choice(TEXTS)}'.",
        steps=[calls(find), say("I'm sorry, Spam Caller is blocked, and I can't message a blocked contact.")],
        communicate=["blocked"], known_info="You are Jo.", facts=FACTS,
    )


@template("contacts", "parallel")
def text_two(ctx: Ctx) -> Draft:
    text = ctx.rng.choice(TEXTS)
    sends = [Call("a", "send_message", {"contact_id": "k1", "text": text}), Call("b", "send_message", {"contact_id": "k3", "text": text})]
    for c in sends:
        ctx.run(c)
    return Draft(
        opening=f"Send '{text}' to both k1 and k3.",
        steps=[confirm(f"I'll send \"{text}\" to Alice Moreau (k1) and Bruno Diaz (k3). Shall I go ahead?"), calls(*sends),
               say(lambda r: f"Sent to {r['a']['to']} and {r['b']['to']}.")],
        communicate=["Alice Moreau", "Bruno Diaz"], known_info="You are Jo.", facts=FACTS,
    )
