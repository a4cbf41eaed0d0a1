"""Out-of-scope requests in every domain: the right answer is to transfer to a human (docs/synthesis.md)."""

from __future__ import annotations

from k2.agentic.synth.plan import Ctx, Draft, say
from k2.agentic.synth.templates import template

OUT_OF_SCOPE = {
    "bank": ("I'd like to apply for a mortgage.", "open a mortgage application"),
    "shop": ("I want to become a seller on your marketplace.", "set up seller accounts"),
    "calendar": ("Can you book me a flight to Lisbon?", "book flights"),
    "notes": ("Can you recover a file I deleted last year?", "recover deleted files"),
    "contacts": ("Please port my phone number to another carrier.", "port phone numbers"),
    "device": ("My screen is cracked; can you order a repair?", "order repairs"),
}


def _transfer(domain: str):
    request, cannot = OUT_OF_SCOPE[domain]

    def out_of_scope(ctx: Ctx) -> Draft:
        return Draft(
            opening=request,
            steps=[say(f"I'm sorry, I can't {cannot} with the tools I have. I'm transferring you to a human agent who can help.")],
            communicate=["human agent"], known_info="", facts={"your name|who": "I'd rather not say."},
        )

    out_of_scope.__name__ = "out_of_scope"
    return out_of_scope


for _domain in OUT_OF_SCOPE:
    template(_domain, "impossible")(_transfer(_domain))
