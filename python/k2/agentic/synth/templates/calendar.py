"""Calendar task templates (docs/synthesis.md)."""

from __future__ import annotations

from k2.agentic.synth.plan import Call, Ctx, Draft, Secret, ask, calls, confirm, say
from k2.agentic.synth.templates import template

DAYS = ("2025-03-10", "2025-03-11", "2025-03-12", "2025-03-13", "2025-03-14")
TITLES = ("Lunch with Kim", "Budget sync", "Yoga", "Design review", "Call with the bank", "Team retro", "Haircut", "Interview")
FACTS = {"your name|who": "I'm Sam.", "email address": "I'm sam@example.com."}


def _hm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _free_slot(ctx: Ctx, day: str, length: int) -> tuple[str, str]:
    for _ in range(40):
        start = ctx.rng.randrange(8 * 4, 18 * 4) * 15
        begin, end = f"{day} {_hm(start)}", f"{day} {_hm(start + length)}"
        clash = any(e["start"] < end and begin < e["end"] for e in ctx.state["events"].values())
        if not clash and start + length <= 20 * 60:
            return begin, end
    return f"{day} 19:00", f"{day} {_hm(19 * 60 + length)}"


@template("calendar", "single", info=True)
def day_agenda(ctx: Ctx) -> Draft:
    day = ctx.rng.choice(DAYS[:3])
    call = Call("d", "list_events", {"date": day})
    got = ctx.run(call)
    return Draft(
        opening=f"What's on my calendar on {day}?",
        vague="Can you tell me what's on my calendar one of these days?",
        secrets=[Secret("date", f"On {day}.", (day,))],
        steps=[calls(call), say(lambda r: f"On {day} you have: " + "; ".join(f"{e['title']} at {e['start'][11:]}" for e in r["d"]) + ".")],
        communicate=[e["title"] for e in got], known_info="You are Sam (sam@example.com).", facts=FACTS,
    )


@template("calendar", "single")
def book(ctx: Ctx) -> Draft:
    day = ctx.rng.choice(DAYS)
    title = ctx.rng.choice(TITLES)
    start, end = _free_slot(ctx, day, ctx.rng.choice((30, 45, 60)))
    call = Call("e", "create_event", {"title": title, "start": start, "end": end})
    ctx.run(call)
    return Draft(
        opening=f"Please add '{title}' to my calendar from {start} to {end[11:]}.",
        steps=[confirm(f"I'll create '{title}' from {start} to {end}. Shall I go ahead?"), calls(call),
               say(lambda r: f"'{title}' is booked for {start} to {end[11:]} (id {r['e']['id']}).")],
        communicate=[start], known_info="You are Sam.", facts=FACTS,
    )


@template("calendar", "multi", info=True)
def move(ctx: Ctx) -> Draft:
    event = ctx.rng.choice(sorted(ctx.state["events"]))
    ev = ctx.state["events"][event]
    length = (int(ev["end"][11:13]) * 60 + int(ev["end"][14:])) - (int(ev["start"][11:13]) * 60 + int(ev["start"][14:]))
    start, end = _free_slot(ctx, ctx.rng.choice(DAYS), length)
    read = Call("e", "get_event", {"event_id": event})
    shift = Call("m", "move_event", {"event_id": event, "start": start, "end": end})
    ctx.run(read)
    ctx.run(shift)
    return Draft(
        opening=f"Please move event {event} ('{ev['title']}') to start at {start}.",
        vague=f"Please move my '{ev['title']}' to another time.",
        secrets=[Secret("new time", f"Move it to start at {start}; its id is {event}.", (start, event))],
        steps=[calls(read), confirm(f"I'll move '{ev['title']}' to {start}-{end[11:]}. Shall I go ahead?"), calls(shift),
               say(f"'{ev['title']}' now runs from {start} to {end[11:]}.")],
        communicate=[start], known_info="You are Sam.", facts=FACTS,
    )


@template("calendar", "multi")
def book_free_slot(ctx: Ctx) -> Draft:
    day = ctx.rng.choice(DAYS[:3])
    length = ctx.rng.choice((30, 60, 90))
    title = ctx.rng.choice(TITLES)
    find = Call("f", "find_free_slot", {"date": day, "duration_minutes": length})
    slot = ctx.run(find)
    book = Call("e", "create_event", {"title": title, "start": slot["start"], "end": slot["end"]})
    ctx.run(book)
    return Draft(
        opening=f"Find me the first free {length}-minute slot on {day} and book '{title}' there.",
        steps=[calls(find), confirm(f"The first free slot is {slot['start']} to {slot['end'][11:]}. Shall I book '{title}' then?"),
               calls(book), say(lambda r: f"Booked '{title}' from {r['e']['start']} to {r['e']['end'][11:]}.")],
        communicate=[slot["start"]], known_info="You are Sam.", facts=FACTS,
    )


@template("calendar", "single")
def invite(ctx: Ctx) -> Draft:
    event = ctx.rng.choice(sorted(ctx.state["events"]))
    ev = ctx.state["events"][event]
    guest = ctx.rng.choice(("kim", "lou", "max", "ivy", "noor", "zoe")) + "@example.com"
    call = Call("a", "add_attendee", {"event_id": event, "email": guest})
    ctx.run(call)
    return Draft(
        opening=f"Please invite {guest} to {event} ('{ev['title']}').",
        steps=[calls(call), say(f"{guest} is now invited to '{ev['title']}'.")],
        communicate=[guest], known_info="You are Sam.", facts=FACTS,
    )


@template("calendar", "parallel")
def two_days(ctx: Ctx) -> Draft:
    a, b = sorted(ctx.rng.sample(DAYS[:3], 2))
    reads = [Call("a", "list_events", {"date": a}), Call("b", "list_events", {"date": b})]
    got = [ctx.run(c) for c in reads]

    def tell(r: dict) -> str:
        return " ".join(f"On {d}: " + (", ".join(e["title"] for e in r[k]) or "nothing") + "." for d, k in ((a, "a"), (b, "b")))

    return Draft(
        opening=f"What do I have on {a} and on {b}?",
        steps=[calls(*reads), say(tell)],
        communicate=[e["title"] for g in got for e in g], known_info="You are Sam.", facts=FACTS,
    )


@template("calendar", "error")
def clash(ctx: Ctx) -> Draft:
    event = ctx.rng.choice(sorted(ctx.state["events"]))
    ev = ctx.state["events"][event]
    day, at = ev["start"][:10], ev["start"][11:]
    title = ctx.rng.choice(TITLES)
    h, m = int(at[:2]), int(at[3:])
    end = f"{day} {_hm(h * 60 + m + 30)}"
    first = Call("fail", "create_event", {"title": title, "start": ev["start"], "end": end}, "conflict")
    ctx.run(first)
    slot = ctx.run(Call("f", "find_free_slot", {"date": day, "duration_minutes": 30, "earliest": at}))  # the user's fallback
    book = Call("e", "create_event", {"title": title, "start": slot["start"], "end": slot["end"]})
    ctx.run(book)
    return Draft(
        opening=f"Please book '{title}' at {ev['start']} for 30 minutes.",
        facts={**FACTS, "other time": f"Then {slot['start']} to {slot['end'][11:]}, please."},
        steps=[calls(first), ask(f"That clashes with '{ev['title']}'. What other time would suit you?", slot["start"]),
               calls(book), say(f"Booked '{title}' from {slot['start']} to {slot['end'][11:]}.")],
        communicate=[slot["start"]], known_info=f"You are Sam. If {ev['start']} is taken, {slot['start']} works.",
    )


@template("calendar", "impossible")
def no_such_event(ctx: Ctx) -> Draft:
    day = ctx.rng.choice(DAYS[3:])
    title = ctx.rng.choice(TITLES)
    call = Call("d", "list_events", {"date": day})
    ctx.run(call)
    return Draft(
        opening=f"Please cancel my '{title}' on {day}.",
        steps=[calls(call), say(f"I found no event on {day}, so there is no '{title}' to cancel. Nothing was changed.")],
        communicate=["no event"], known_info="You are Sam.", facts=FACTS,
    )


@template("calendar", "parallel")
def two_events(ctx: Ctx) -> Draft:
    a, b = sorted(ctx.rng.sample(sorted(ctx.state["events"]), 2))
    reads = [Call("a", "get_event", {"event_id": a}), Call("b", "get_event", {"event_id": b})]
    got = [ctx.run(c) for c in reads]
    return Draft(
        opening=f"When do events {a} and {b} start?",
        steps=[calls(*reads), say(lambda r: f"'{r['a']['title']}' starts at {r['a']['start']} and '{r['b']['title']}' at {r['b']['start']}.")],
        communicate=[g["start"] for g in got], known_info="You are Sam.", facts=FACTS,
    )
