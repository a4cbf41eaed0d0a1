"""Agents: a system prompt (a role and the domain's policy) plus a small tool subset (docs/synthesis.md).

Episodes must fit 1,024 tokens, so an agent declares at most ``max_tools`` (default 4) tools: the
ones its task's plan calls, then distractors from the same domain. Each tool is one variant, drawn
from the train or the held-out pool according to the episode's split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from k2.agentic.domain import get_domain
from k2.agentic.synth.evolve import ToolVariant, VariantPool
from k2.errors import AgenticError

ROLES: dict[str, tuple[str, ...]] = {
    "bank": ("You are a support agent for Northwind Bank.", "You are a banking assistant.", "You help customers of a retail bank with their accounts."),
    "shop": ("You are a customer-service agent for an online electronics shop.", "You are a helpful store assistant.", "You handle orders for an online shop."),
    "calendar": ("You are a scheduling assistant.", "You manage Sam's calendar.", "You are a personal calendar agent."),
    "notes": ("You are a notes assistant with access to the user's files.", "You manage the user's text notes.", "You are a file assistant."),
    "contacts": ("You are a phone assistant for contacts and messages.", "You manage the user's address book and texts.", "You are a messaging assistant."),
    "device": ("You are a phone settings assistant.", "You help the user configure their phone.", "You are a device support agent."),
}
STYLE = (
    "Use only the tools declared, with arguments exactly as they are declared.",
    "Ask the user for anything you need and do not know. Use the declared tools only.",
    "Follow each tool's declared parameter names and formats.",
)
# Policy sentences that describe the base tools' formats, which a variant may change.
FORMAT_SENTENCES = {
    "bank": ("Amounts are in cents. ", "Amounts follow each tool's declared format. "),
    "calendar": ("Times are local, written YYYY-MM-DD HH:MM. ", "Times are local; write them as each tool declares. "),
}


@dataclass
class Agent:
    """The system prompt's role line, the domain policy it states and the declared tools."""

    domain: str
    role: str
    policy: str
    tools: list[ToolVariant]

    @property
    def id(self) -> str:
        return "+".join(v.id for v in self.tools)


def agent_policy(domain: str) -> str:
    """The domain's policy with its base-format sentence made variant-neutral."""
    policy = get_domain(domain).policy
    if domain in FORMAT_SENTENCES:
        old, new = FORMAT_SENTENCES[domain]
        policy = policy.replace(old, new)
    return policy


def draw_agent(
    rng: random.Random, pool: VariantPool, domain: str, needed: Sequence[str], split: str, max_tools: int = 4,
    tool_chars: int = 1500,
) -> Agent:
    """An agent for ``domain`` that declares variants of the ``needed`` base tools and, up to
    ``max_tools`` in all, random other tools of the domain as long as the declarations' JSON stays
    within ``tool_chars`` (distractors that would pass it are skipped); the order is shuffled. When
    the needed tools alone pass the budget, each is redrawn up to three times for a shorter
    declaration, so long plans still fit the episode length."""
    if len(needed) > max_tools:
        raise AgenticError(f"a plan needs {len(needed)} tools ({', '.join(needed)}) but agents declare at most {max_tools}")
    others = sorted({base for (d, base) in pool.by_tool if d == domain} - set(needed))
    extra = rng.randrange(0, max(0, max_tools - len(needed)) + 1)
    if not needed and extra == 0:
        extra = 1
    tools = [pool.choose(rng, domain, base, split) for base in needed]
    names = {t.name for t in tools}
    if len(names) != len(tools):  # two needed tools drew one name: draw again, deterministically
        for _ in range(20):
            tools = [pool.choose(rng, domain, base, split) for base in needed]
            names = {t.name for t in tools}
            if len(names) == len(tools):
                break
        else:
            raise AgenticError(f"could not draw distinct tool names for {list(needed)}")
    size = sum(len(json.dumps(t.spec)) for t in tools)
    if size > tool_chars:  # a long plan's own tools already fill the budget: prefer compact variants
        for i, base in enumerate(needed):
            for _ in range(3):
                other = pool.choose(rng, domain, base, split)
                if len(json.dumps(other.spec)) < len(json.dumps(tools[i].spec)) and other.name not in names - {tools[i].name}:
                    names = (names - {tools[i].name}) | {other.name}
                    tools[i] = other
        size = sum(len(json.dumps(t.spec)) for t in tools)
    for base in rng.sample(others, min(extra, len(others))):
        candidate = pool.choose(rng, domain, base, split)
        cost = len(json.dumps(candidate.spec))
        if candidate.name in names or (tools and size + cost > tool_chars):
            continue
        tools.append(candidate)
        names.add(candidate.name)
        size += cost
    rng.shuffle(tools)
    role = f"{rng.choice(ROLES[domain])} {rng.choice(STYLE)}"
    return Agent(domain, role, agent_policy(domain), tools)
