"""Out-of-scope requests in every domain: the right answer is to transfer to a human (docs/synthesis.md)."""

from __future__ import annotations

from k2.agentic.synth.plan import Ctx, Draft, say
from k2.agentic.synth.templates import template

OUT_OF_SCOPE = {
    "bank": (("I'd like to apply for a mortgage.", "open a mortgage application"),
             ("Can you raise my credit card limit?", "change credit card limits"),
             ("I want to dispute a charge from last year.", "open disputes")),
    "shop": (("I want to become a seller on your marketplace.", "set up seller accounts"),
             ("Can you price-match a competitor's offer?", "price-match offers"),
             ("Please delete my account and all my data.", "delete accounts")),
    "calendar": (("Can you book me a flight to Lisbon?", "book flights"),
                 ("Please order catering for my team lunch.", "order catering"),
                 ("Can you share my calendar with my whole company?", "change sharing settings")),
    "notes": (("Can you recover a file I deleted last year?", "recover deleted files"),
              ("Please print my todo list.", "print files"),
              ("Can you sync my notes to my laptop?", "set up syncing")),
    "contacts": (("Please port my phone number to another carrier.", "port phone numbers"),
                 ("Can you call Bruno for me?", "place phone calls"),
                 ("Find out who keeps calling me from a hidden number.", "trace hidden numbers")),
    "device": (("My screen is cracked; can you order a repair?", "order repairs"),
               ("Please update my phone's operating system.", "install system updates"),
               ("Can you unlock my phone for another carrier?", "carrier-unlock phones")),
}


def _transfer(domain: str):
    def out_of_scope(ctx: Ctx) -> Draft:
        request, cannot = ctx.rng.choice(OUT_OF_SCOPE[domain])
        return Draft(
            opening=request,
            steps=[say(f"I'm sorry, I can't {cannot} with the tools I have. I'm transferring you to a human agent who can help.")],
            communicate=["human agent"], known_info="", facts={"your name|who": "I'd rather not say."},
        )

    out_of_scope.__name__ = "out_of_scope"
    return out_of_scope


for _domain in OUT_OF_SCOPE:
    template(_domain, "impossible")(_transfer(_domain))
