"""Device task templates (docs/synthesis.md)."""

from __future__ import annotations

from k2.agentic.synth.plan import Call, Ctx, Draft, Secret, calls, confirm, say
from k2.agentic.synth.templates import template

FACTS = {"your name|who": "I'm Riley."}


def _vary(ctx: Ctx) -> None:
    ctx.override({"settings": {"brightness": ctx.rng.randrange(5, 100), "volume": ctx.rng.randrange(0, 100),
                               "bluetooth": ctx.rng.random() < 0.5, "do_not_disturb": ctx.rng.random() < 0.5}})


@template("device", "single")
def check_levels(ctx: Ctx) -> Draft:
    _vary(ctx)
    call = Call("s", "get_settings", {})
    got = ctx.run(call)
    return Draft(
        opening="What are my brightness and volume set to?",
        steps=[calls(call), say(lambda r: f"Brightness is at {r['s']['brightness']} and volume at {r['s']['volume']}.")],
        communicate=[str(got["brightness"]), str(got["volume"])], known_info="You are Riley.", facts=FACTS,
    )


@template("device", "single", info=True)
def set_level(ctx: Ctx) -> Draft:
    _vary(ctx)
    setting = ctx.rng.choice(("brightness", "volume"))
    value = ctx.rng.randrange(0, 101)
    call = Call("l", "set_level", {"setting": setting, "value": value})
    ctx.run(call)
    return Draft(
        opening=f"Set my {setting} to {value}.",
        vague=f"Please change my {setting}.",
        secrets=[Secret("level", f"Make it {value}.", (str(value),))],
        steps=[calls(call), say(f"Your {setting} is now {value}.")],
        communicate=[f"{setting} is now {value}"], known_info="You are Riley.", facts=FACTS,
    )


@template("device", "single")
def toggle(ctx: Ctx) -> Draft:
    _vary(ctx)
    setting = ctx.rng.choice(("bluetooth", "do_not_disturb", "location"))
    enabled = not ctx.state["settings"][setting]
    call = Call("t", "set_toggle", {"setting": setting, "enabled": enabled})
    ctx.run(call)
    word = "on" if enabled else "off"
    shown = setting.replace("_", " ")
    return Draft(
        opening=f"Turn {shown} {word}.",
        steps=[calls(call), say(f"{shown.capitalize()} is now {word}.")],
        communicate=[f"{shown} is now {word}"], known_info="You are Riley.", facts=FACTS,
    )


@template("device", "multi")
def join_cafe(ctx: Ctx) -> Draft:
    scan = Call("w", "scan_wifi", {})
    join = Call("c", "connect_wifi", {"ssid": "CafeFree"})
    ctx.run(scan)
    ctx.run(join)
    return Draft(
        opening="Connect me to the open cafe Wi-Fi, CafeFree.",
        steps=[calls(scan), calls(join), say("You're now connected to CafeFree. It is an open network, so avoid sensitive logins.")],
        communicate=["connected to CafeFree"], known_info="You are Riley.", facts=FACTS,
    )


@template("device", "multi", info=True)
def revoke(ctx: Ctx) -> Draft:
    app = ctx.rng.choice(sorted(ctx.state["apps"]))
    perm = ctx.rng.choice(ctx.state["apps"][app]["permissions"])
    read = Call("p", "list_app_permissions", {"app": app})
    take = Call("r", "revoke_permission", {"app": app, "permission": perm})
    ctx.run(read)
    ctx.run(take)
    return Draft(
        opening=f"Take the {perm} permission away from the {app} app.",
        vague=f"One of my apps has a permission I don't like; take the {perm} permission away from it.",
        secrets=[Secret("app name", f"The {app} app.", (app,))],
        steps=[calls(read), calls(take), say(lambda r: f"{app} no longer has {perm}; it keeps: {', '.join(r['r']['permissions']) or 'nothing'}.")],
        communicate=[f"no longer has {perm}"], known_info="You are Riley.", facts=FACTS,
    )


@template("device", "parallel")
def both_levels(ctx: Ctx) -> Draft:
    _vary(ctx)
    b, v = ctx.rng.randrange(0, 101), ctx.rng.randrange(0, 101)
    writes = [Call("b", "set_level", {"setting": "brightness", "value": b}), Call("v", "set_level", {"setting": "volume", "value": v})]
    for c in writes:
        ctx.run(c)
    return Draft(
        opening=f"Set brightness to {b} and volume to {v}.",
        steps=[calls(*writes), say(f"Done: brightness {b}, volume {v}.")],
        communicate=[f"brightness {b}", f"volume {v}"], known_info="You are Riley.", facts=FACTS,
    )


@template("device", "error")
def airplane_first(ctx: Ctx) -> Draft:
    ctx.override({"settings": {"airplane_mode": True, "wifi": False, "bluetooth": False, "mobile_data": False}, "connected": None})
    first = Call("fail", "set_toggle", {"setting": "wifi", "enabled": True}, "invalid_state")
    off = Call("a", "set_toggle", {"setting": "airplane_mode", "enabled": False})
    on = Call("w", "set_toggle", {"setting": "wifi", "enabled": True})
    for c in (first, off, on):
        ctx.run(c)
    return Draft(
        opening="Turn my Wi-Fi on, please.",
        steps=[calls(first), confirm("Airplane mode is on, which keeps Wi-Fi off. Shall I turn airplane mode off first?"),
               calls(off), calls(on), say("Airplane mode is off and Wi-Fi is on again.")],
        communicate=["Wi-Fi is on"], known_info="You are Riley. Turning airplane mode off is fine.", facts=FACTS,
    )


@template("device", "impossible")
def office_out_of_range(ctx: Ctx) -> Draft:
    scan = Call("w", "scan_wifi", {})
    ctx.run(scan)
    return Draft(
        opening="Connect me to Office5G.",
        steps=[calls(scan), say("Office5G is not in range right now, so I can't connect to it. Try again when you're at the office.")],
        communicate=["not in range"], known_info="You are Riley.", facts=FACTS,
    )


@template("device", "impossible")
def reveal_password(ctx: Ctx) -> Draft:
    return Draft(
        opening="What's the password of my saved HomeNet Wi-Fi?",
        steps=[say("I'm sorry, I can't reveal saved Wi-Fi passwords. You can find it on your router or ask whoever set up the network.")],
        communicate=["can't reveal"], known_info="You are Riley.", facts=FACTS,
    )


@template("device", "parallel")
def two_apps(ctx: Ctx) -> Draft:
    a, b = sorted(ctx.rng.sample(sorted(ctx.state["apps"]), 2))
    reads = [Call("a", "list_app_permissions", {"app": a}), Call("b", "list_app_permissions", {"app": b})]
    got = [ctx.run(c) for c in reads]
    return Draft(
        opening=f"Which permissions do {a} and {b} have?",
        steps=[calls(*reads), say(lambda r: f"{a}: {', '.join(r['a'])}. {b}: {', '.join(r['b'])}.")],
        communicate=[p for g in got for p in g], known_info="You are Riley.", facts=FACTS,
    )


@template("device", "error")
def level_too_high(ctx: Ctx) -> Draft:
    _vary(ctx)
    setting = ctx.rng.choice(("brightness", "volume"))
    wanted = ctx.rng.randrange(101, 200)
    first = Call("fail", "set_level", {"setting": setting, "value": wanted}, "invalid_argument")
    fix = Call("l", "set_level", {"setting": setting, "value": 100})
    ctx.run(first)
    ctx.run(fix)
    return Draft(
        opening=f"Put my {setting} at {wanted}!",
        steps=[calls(first), confirm(f"{setting.capitalize()} only goes up to 100. Shall I set it to 100?"), calls(fix),
               say(f"Your {setting} is now at its maximum, 100.")],
        communicate=["100"], known_info="You are Riley. The maximum is fine.", facts=FACTS,
    )
