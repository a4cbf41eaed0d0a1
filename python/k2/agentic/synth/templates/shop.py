"""Shop task templates (docs/synthesis.md)."""

from __future__ import annotations

from k2.agentic.synth.plan import Call, Ctx, Draft, Secret, calls, confirm, money, say
from k2.agentic.synth.templates import template

PEOPLE = {"u1": ("Ines Park", "ines@example.com"), "u2": ("Tom Berg", "tom@example.com")}
STREETS = ("Elm St", "Oak Ave", "Pine Rd", "Lake Dr", "Hill Way", "Mill Lane", "Birch Ct")
IN_STOCK = ("kb-01", "hd-03", "cb-04")


def _facts(cid: str) -> dict[str, str]:
    name, email = PEOPLE[cid]
    return {"your name|who": f"I'm {name}.", "email address|e-mail": f"My email is {email}."}


def _vary_stock(ctx: Ctx) -> None:
    ctx.override({"products": {sku: {"stock": ctx.rng.randrange(3, 40)} for sku in IN_STOCK}})


@template("shop", "single", info=True)
def order_status(ctx: Ctx) -> Draft:
    cid = ctx.rng.choice(sorted(PEOPLE))
    orders = sorted(o for o, v in ctx.state["orders"].items() if v["customer"] == cid)
    order = ctx.rng.choice(orders)
    call = Call("o", "get_order", {"order_id": order})
    got = ctx.run(call)
    name = PEOPLE[cid][0]
    return Draft(
        opening=f"Hi, I'm {name}. What is the status of my order {order}?",
        vague=f"Hi, I'm {name}. Can you tell me where one of my orders stands?",
        secrets=[Secret("order number", f"The order is {order}.", (order,))],
        steps=[calls(call), say(lambda r: f"Your order {order} is {r['o']['status']}.")],
        communicate=[got["status"]], known_info=f"You are {name}.", facts=_facts(cid),
    )


@template("shop", "single")
def price_check(ctx: Ctx) -> Draft:
    _vary_stock(ctx)
    sku = ctx.rng.choice(IN_STOCK)
    call = Call("p", "get_product", {"sku": sku})
    got = ctx.run(call)
    return Draft(
        opening=f"How much is product {sku}, and how many do you have in stock?",
        steps=[calls(call), say(lambda r: f"{r['p']['name']} costs {money(r['p']['price_cents'])} and {r['p']['stock']} are in stock.")],
        communicate=[money(got["price_cents"]), str(got["stock"])], known_info="You are Tom Berg.", facts=_facts("u2"),
    )


@template("shop", "parallel")
def compare_products(ctx: Ctx) -> Draft:
    _vary_stock(ctx)
    a, b = ctx.rng.sample(IN_STOCK, 2)
    reads = [Call("a", "get_product", {"sku": a}), Call("b", "get_product", {"sku": b})]
    got = [ctx.run(c) for c in reads]
    return Draft(
        opening=f"What do {a} and {b} cost?",
        steps=[calls(*reads), say(lambda r: f"{a} costs {money(r['a']['price_cents'])} and {b} costs {money(r['b']['price_cents'])}.")],
        communicate=[money(g["price_cents"]) for g in got], known_info="You are Ines Park.", facts=_facts("u1"),
    )


@template("shop", "multi", info=True)
def cancel(ctx: Ctx) -> Draft:
    find = Call("c", "find_customer", {"email": "ines@example.com"})
    read = Call("o", "get_order", {"order_id": "o-502"})
    stop = Call("x", "cancel_order", {"order_id": "o-502"})
    ctx.run(find)
    ctx.run(read)
    done = ctx.run(stop)
    return Draft(
        opening="Hi, I'm Ines Park (ines@example.com). Please cancel my order o-502.",
        vague="Hi, I'm Ines Park. I want to cancel an order I placed.",
        secrets=[Secret("order number", "It's order o-502.", ("o-502",))],
        steps=[calls(find), calls(read), confirm("I'll cancel o-502 and refund it in full. Shall I go ahead?"), calls(stop),
               say(lambda r: f"o-502 is cancelled and {money(r['x']['refunded_cents'])} will be refunded to your original payment.")],
        communicate=[money(done["refunded_cents"])], known_info="You are Ines Park, ines@example.com.", facts=_facts("u1"),
    )


@template("shop", "multi")
def return_item(ctx: Ctx) -> Draft:
    sku = ctx.rng.choice(("kb-01", "cb-04"))
    reason = ctx.rng.choice(("damaged", "wrong item", "not needed", "arrived late"))
    read = Call("o", "get_order", {"order_id": "o-501"})
    back = Call("r", "return_items", {"order_id": "o-501", "skus": [sku], "reason": reason})
    ctx.run(read)
    done = ctx.run(back)
    return Draft(
        opening=f"Hi, Ines Park here. I'd like to return {sku} from order o-501; reason: {reason}.",
        steps=[calls(read), confirm(f"I'll return {sku} from o-501 ({reason}) for a refund. Shall I go ahead?"), calls(back),
               say(lambda r: f"The return is done: {money(r['r']['refunded_cents'])} will be refunded.")],
        communicate=[money(done["refunded_cents"])], known_info="You are Ines Park, ines@example.com.", facts=_facts("u1"),
    )


@template("shop", "single", info=True)
def new_address(ctx: Ctx) -> Draft:
    cid = ctx.rng.choice(sorted(PEOPLE))
    address = f"{ctx.rng.randrange(1, 200)} {ctx.rng.choice(STREETS)}"
    call = Call("a", "update_address", {"customer_id": cid, "address": address})
    ctx.run(call)
    name = PEOPLE[cid][0]
    return Draft(
        opening=f"Hi, I'm {name}, customer {cid}. Please change my shipping address to {address}.",
        vague=f"Hi, I'm {name}, customer {cid}. I moved and need to update my shipping address.",
        secrets=[Secret("new address", f"The new address is {address}.", (address,))],
        steps=[confirm(f"I'll set the shipping address of {cid} to {address}. Shall I go ahead?"), calls(call),
               say(f"Your shipping address is now {address}.")],
        communicate=[address], known_info=f"You are {name}, customer {cid}.", facts=_facts(cid),
    )


@template("shop", "multi")
def place(ctx: Ctx) -> Draft:
    _vary_stock(ctx)
    sku = ctx.rng.choice(IN_STOCK)
    qty = ctx.rng.randrange(1, 3)
    read = Call("p", "get_product", {"sku": sku})
    order = Call("o", "place_order", {"customer_id": "u2", "items": {sku: qty}})
    ctx.run(read)
    done = ctx.run(order)
    return Draft(
        opening=f"Hi, Tom Berg here, customer u2. Please order {qty} of {sku} for me.",
        steps=[calls(read), confirm(f"I'll order {qty} x {sku}. Shall I go ahead?"), calls(order),
               say(lambda r: f"Your order {r['o']['id']} is placed; the total is {money(r['o']['total_cents'])}.")],
        communicate=[money(done["total_cents"])], known_info="You are Tom Berg, customer u2.", facts=_facts("u2"),
    )


@template("shop", "error")
def partly_out_of_stock(ctx: Ctx) -> Draft:
    _vary_stock(ctx)
    sku = ctx.rng.choice(IN_STOCK)
    first = Call("fail", "place_order", {"customer_id": "u2", "items": {sku: 1, "ms-02": 1}}, "out_of_stock")
    second = Call("o", "place_order", {"customer_id": "u2", "items": {sku: 1}})
    ctx.run(first)
    done = ctx.run(second)
    return Draft(
        opening=f"Hi, Tom Berg, customer u2. Please order one {sku} and one ms-02.",
        steps=[confirm(f"I'll order 1 x {sku} and 1 x ms-02. Shall I go ahead?"), calls(first),
               confirm(f"ms-02 is out of stock. Shall I order just the {sku} for now?"), calls(second),
               say(lambda r: f"Done: order {r['o']['id']} for {sku} is placed, total {money(r['o']['total_cents'])}. ms-02 was out of stock.")],
        communicate=[money(done["total_cents"])], known_info="You are Tom Berg, customer u2.", facts=_facts("u2"),
    )


@template("shop", "impossible")
def cancel_shipped(ctx: Ctx) -> Draft:
    read = Call("o", "get_order", {"order_id": "o-503"})
    ctx.run(read)
    return Draft(
        opening="Hi, Tom Berg here. Please cancel my order o-503.",
        steps=[calls(read), say("I'm sorry, o-503 has already shipped, and only orders that have not shipped can be cancelled. Once it is delivered you can return it.")],
        communicate=["shipped"], known_info="You are Tom Berg, customer u2.", facts=_facts("u2"),
    )


@template("shop", "parallel")
def two_orders(ctx: Ctx) -> Draft:
    reads = [Call("a", "get_order", {"order_id": "o-501"}), Call("b", "get_order", {"order_id": "o-502"})]
    got = [ctx.run(c) for c in reads]
    return Draft(
        opening="Hi, Ines Park here. Where are my orders o-501 and o-502?",
        steps=[calls(*reads), say(lambda r: f"o-501 is {r['a']['status']} and o-502 is {r['b']['status']}.")],
        communicate=[f"o-501 is {got[0]['status']}", f"o-502 is {got[1]['status']}"], known_info="You are Ines Park.", facts=_facts("u1"),
    )


@template("shop", "error")
def cancel_delivered(ctx: Ctx) -> Draft:
    first = Call("fail", "cancel_order", {"order_id": "o-501"}, "invalid_state")
    read = Call("o", "get_order", {"order_id": "o-501"})
    ctx.run(first)
    order = ctx.run(read)
    skus = sorted(order["items"])
    back = Call("r", "return_items", {"order_id": "o-501", "skus": skus, "reason": "customer cancelled"})
    done = ctx.run(back)
    return Draft(
        opening="Hi, Ines Park. Please cancel my order o-501.",
        steps=[calls(first), calls(read),
               confirm(f"o-501 was already delivered, so it can't be cancelled. Shall I return its items ({', '.join(skus)}) for a refund instead?"),
               calls(back), say(lambda r: f"The items are returned and {money(r['r']['refunded_cents'])} will be refunded.")],
        communicate=[money(done["refunded_cents"])], known_info="You are Ines Park. A return is fine too.", facts=_facts("u1"),
    )
