"""Bank task templates (docs/synthesis.md)."""

from __future__ import annotations

from k2.agentic.synth.plan import Call, Ctx, Draft, Secret, calls, confirm, money, say
from k2.agentic.synth.templates import template

OWN = {"c100": ("Mia Li", "acc-1001", "acc-1002"), "c200": ("Omar Haddad", "acc-2001", None)}
PAYEES = ("City Water", "Metro Power", "Fiber Net", "Green Gas", "Oak Insurance", "Town Tax Office")


def _vary_balances(ctx: Ctx) -> None:
    ctx.override({"accounts": {
        "acc-1001": {"balance_cents": ctx.rng.randrange(50_000, 600_000)},
        "acc-1002": {"balance_cents": ctx.rng.randrange(400_000, 2_000_000)},
        "acc-2001": {"balance_cents": ctx.rng.randrange(5_000, 300_000)},
    }})


def _who(ctx: Ctx) -> tuple[str, str, str]:
    cid = ctx.rng.choice(sorted(OWN))
    name, checking, savings = OWN[cid]
    account = checking if savings is None else ctx.rng.choice((checking, savings))
    return cid, name, account


def _facts(cid: str, name: str) -> dict[str, str]:
    return {"your name|who": f"I'm {name}.", "customer id|identify": f"My customer id is {cid}."}


@template("bank", "single", info=True)
def balance(ctx: Ctx) -> Draft:
    _vary_balances(ctx)
    cid, name, acc = _who(ctx)
    got = ctx.run(Call("acc", "get_account", {"account_id": acc}))
    return Draft(
        opening=f"Hi, I'm {name} ({cid}). What is the balance of my account {acc}?",
        vague=f"Hi, I'm {name}. Could you check one of my account balances for me?",
        secrets=[Secret("account number", f"It's account {acc}.", (acc,))],
        steps=[calls(Call("acc", "get_account", {"account_id": acc})),
               say(lambda r: f"The balance of {acc} is {money(r['acc']['balance_cents'])} {r['acc']['currency']}.")],
        communicate=[money(got["balance_cents"])], known_info=f"You are {name}, customer id {cid}, account {acc}.",
        facts=_facts(cid, name),
    )


@template("bank", "single")
def last_transaction(ctx: Ctx) -> Draft:
    amount = ctx.rng.randrange(500, 20_000)
    memo = ctx.rng.choice(("Bakery", "Bookshop", "Cinema", "Pharmacy", "Taxi", "Gym"))
    ctx.override({"transactions": [
        {"id": "t1", "account": "acc-1001", "amount_cents": -4_599, "memo": "Grocer", "counterparty": "merchant"},
        {"id": "t2", "account": "acc-1001", "amount_cents": -amount, "memo": memo, "counterparty": "merchant"},
    ]})
    ctx.run(Call("tx", "list_transactions", {"account_id": "acc-1001", "limit": 1}))
    return Draft(
        opening="Hello, this is Mia Li, customer c100. What was the last payment on my checking account acc-1001?",
        steps=[calls(Call("tx", "list_transactions", {"account_id": "acc-1001", "limit": 1})),
               say(lambda r: f"The last transaction on acc-1001 was {r['tx'][0]['memo']} for {money(-r['tx'][0]['amount_cents'])}.")],
        communicate=[memo, money(amount)], known_info="You are Mia Li, customer c100.", facts=_facts("c100", "Mia Li"),
    )


@template("bank", "multi", info=True)
def transfer(ctx: Ctx) -> Draft:
    _vary_balances(ctx)
    amount = ctx.rng.randrange(10, 450) * 100 + ctx.rng.choice((0, 0, 50, 25))
    src, dst = ctx.rng.choice((("acc-1002", "acc-1001"), ("acc-1001", "acc-1002")))
    if ctx.state["accounts"][src]["balance_cents"] < amount:
        amount = ctx.state["accounts"][src]["balance_cents"] // 2
    read = Call("src", "get_account", {"account_id": src})
    move = Call("move", "transfer", {"from_account": src, "to_account": dst, "amount_cents": amount})
    ctx.run(read)
    done = ctx.run(move)
    return Draft(
        opening=f"Hi, Mia Li here, customer c100. Please move {money(amount)} dollars from {src} to {dst}.",
        vague="Hi, I'm Mia Li. I need to move some money between my accounts.",
        secrets=[Secret("customer id", "My customer id is c100.", ("c100",)),
                 Secret("amount", f"Move {money(amount)} from {src} to {dst}.", (money(amount), src, dst))],
        steps=[calls(read),
               confirm(f"To confirm: I will transfer {money(amount)} from {src} to {dst}. Shall I go ahead?"),
               calls(move),
               say(lambda r: f"Done: {money(amount)} moved to {dst}. The new balance of {src} is {money(r['move']['from_balance_cents'])}.")],
        communicate=[money(done["from_balance_cents"])], known_info="You are Mia Li, customer c100.",
        facts={"your name|who": "I'm Mia Li."},
    )


@template("bank", "multi")
def pay_bill(ctx: Ctx) -> Draft:
    _vary_balances(ctx)
    cid, name, acc = _who(ctx)
    payee = ctx.rng.choice(PAYEES)
    amount = min(ctx.rng.randrange(1_000, 40_000), ctx.state["accounts"][acc]["balance_cents"] // 2)
    read = Call("acc", "get_account", {"account_id": acc})
    pay = Call("pay", "pay_bill", {"account_id": acc, "payee": payee, "amount_cents": amount})
    ctx.run(read)
    done = ctx.run(pay)
    return Draft(
        opening=f"Hi, I'm {name}, customer {cid}. Please pay my {payee} bill of {money(amount)} from {acc}.",
        steps=[calls(read), confirm(f"I'll pay {money(amount)} to {payee} from {acc}. Shall I go ahead?"), calls(pay),
               say(lambda r: f"Paid. The new balance of {acc} is {money(r['pay']['balance_cents'])}.")],
        communicate=[money(done["balance_cents"])], known_info=f"You are {name}, customer {cid}.", facts=_facts(cid, name),
    )


@template("bank", "single", info=True)
def freeze(ctx: Ctx) -> Draft:
    cid, name, acc = _who(ctx)
    reason = ctx.rng.choice(("lost card", "stolen card", "suspicious activity", "travelling"))
    call = Call("freeze", "freeze_account", {"account_id": acc, "reason": reason})
    ctx.run(call)
    return Draft(
        opening=f"I'm {name} ({cid}). Please freeze my account {acc}; the reason is: {reason}.",
        vague=f"I'm {name}. I need to freeze one of my accounts right away.",
        secrets=[Secret("account number", f"It's {acc}.", (acc,)), Secret("reason", f"The reason is: {reason}.", (reason,))],
        steps=[confirm(f"I'll freeze {acc} ('{reason}'). Shall I go ahead?"), calls(call),
               say(f"{acc} is now frozen. It can still receive money but cannot send any.")],
        communicate=["frozen"], known_info=f"You are {name}, customer {cid}.", facts=_facts(cid, name),
    )


@template("bank", "parallel")
def both_balances(ctx: Ctx) -> Draft:
    _vary_balances(ctx)
    reads = [Call("a", "get_account", {"account_id": "acc-1001"}), Call("b", "get_account", {"account_id": "acc-1002"})]
    got = [ctx.run(c) for c in reads]
    return Draft(
        opening="Hi, Mia Li, customer c100. What are the balances of my checking acc-1001 and savings acc-1002?",
        steps=[calls(*reads), say(lambda r: f"acc-1001 holds {money(r['a']['balance_cents'])} and acc-1002 holds {money(r['b']['balance_cents'])}.")],
        communicate=[money(g["balance_cents"]) for g in got], known_info="You are Mia Li, customer c100.", facts=_facts("c100", "Mia Li"),
    )


@template("bank", "multi")
def accounts_overview(ctx: Ctx) -> Draft:
    _vary_balances(ctx)
    who = Call("cust", "get_customer", {"customer_id": "c100"})
    reads = [Call("a", "get_account", {"account_id": "acc-1001"}), Call("b", "get_account", {"account_id": "acc-1002"})]
    ctx.run(who)
    got = [ctx.run(c) for c in reads]
    return Draft(
        opening="Hello, I'm customer c100. Which accounts do I have, and how much is in each?",
        steps=[calls(who), calls(*reads),
               say(lambda r: f"You have two accounts: checking acc-1001 with {money(r['a']['balance_cents'])} and savings acc-1002 with {money(r['b']['balance_cents'])}.")],
        communicate=[money(g["balance_cents"]) for g in got], known_info="You are Mia Li, customer c100.", facts=_facts("c100", "Mia Li"),
    )


@template("bank", "error")
def short_on_funds(ctx: Ctx) -> Draft:
    amount = ctx.rng.randrange(100, 450) * 100
    ctx.override({"accounts": {"acc-1001": {"balance_cents": amount - ctx.rng.randrange(100, 9_000)},
                               "acc-1002": {"balance_cents": amount + ctx.rng.randrange(0, 900_000)}}})
    first = Call("fail", "transfer", {"from_account": "acc-1001", "to_account": "acc-2001", "amount_cents": amount}, "insufficient_funds")
    retry = Call("move", "transfer", {"from_account": "acc-1002", "to_account": "acc-2001", "amount_cents": amount})
    ctx.run(first)
    done = ctx.run(retry)
    return Draft(
        opening=f"Hi, Mia Li, customer c100. Please send {money(amount)} from my checking acc-1001 to acc-2001.",
        steps=[confirm(f"I'll transfer {money(amount)} from acc-1001 to acc-2001. Shall I go ahead?"), calls(first),
               confirm(f"acc-1001 does not hold enough for {money(amount)}. Shall I send it from your savings acc-1002 instead?"),
               calls(retry),
               say(lambda r: f"Done: {money(amount)} sent from acc-1002. Its new balance is {money(r['move']['from_balance_cents'])}.")],
        communicate=[money(done["from_balance_cents"])], known_info="You are Mia Li, customer c100. Savings may be used.",
        facts=_facts("c100", "Mia Li"),
    )


@template("bank", "impossible")
def frozen_sender(ctx: Ctx) -> Draft:
    amount = ctx.rng.randrange(10, 300) * 100
    read = Call("acc", "get_account", {"account_id": "acc-3001"})
    ctx.run(read)
    return Draft(
        opening=f"Hi, I'm Lena Ruiz, customer c300. Please send {money(amount)} from my account acc-3001 to acc-2001.",
        steps=[calls(read), say("I'm sorry, but acc-3001 is frozen, so it cannot send money. I can't make this transfer; a branch can help you lift the freeze.")],
        communicate=["frozen"], known_info="You are Lena Ruiz, customer c300.", facts=_facts("c300", "Lena Ruiz"),
    )


@template("bank", "impossible")
def over_daily_limit(ctx: Ctx) -> Draft:
    amount = ctx.rng.randrange(5_100, 9_000) * 100
    ctx.override({"accounts": {"acc-1002": {"balance_cents": amount + 500_000}}})
    read = Call("acc", "get_account", {"account_id": "acc-1002"})
    ctx.run(read)
    return Draft(
        opening=f"Mia Li here, customer c100. Transfer {money(amount)} from my savings acc-1002 to acc-2001 today, please.",
        steps=[calls(read), say(f"I'm sorry, I can't do that: transfers over 5000.00 a day are refused, and {money(amount)} is above that limit. You could split it over several days.")],
        communicate=["5000.00"], known_info="You are Mia Li, customer c100.", facts=_facts("c100", "Mia Li"),
    )


@template("bank", "parallel")
def two_bills(ctx: Ctx) -> Draft:
    _vary_balances(ctx)
    a, b = ctx.rng.sample(PAYEES, 2)
    amounts = [ctx.rng.randrange(1_000, 20_000), ctx.rng.randrange(1_000, 20_000)]
    pays = [Call("a", "pay_bill", {"account_id": "acc-1001", "payee": a, "amount_cents": amounts[0]}),
            Call("b", "pay_bill", {"account_id": "acc-1001", "payee": b, "amount_cents": amounts[1]})]
    for c in pays:
        last = ctx.run(c)
    return Draft(
        opening=f"Mia Li, customer c100. Please pay {a} {money(amounts[0])} and {b} {money(amounts[1])} from acc-1001.",
        steps=[confirm(f"I'll pay {a} {money(amounts[0])} and {b} {money(amounts[1])} from acc-1001. Shall I go ahead?"),
               calls(*pays), say(lambda r: f"Both bills are paid. acc-1001 now holds {money(min(r['a']['balance_cents'], r['b']['balance_cents']))}.")],
        communicate=[money(last["balance_cents"])], known_info="You are Mia Li, customer c100.", facts=_facts("c100", "Mia Li"),
    )
