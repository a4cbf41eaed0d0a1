"""The critic's prompt in the chat format (docs/critic.md, "The critic's prompt").

A comparison is rendered as one conversation in K2's chat format
(:func:`k2.data.chat.render_chat`):

* a system message: the critic's job, the rubrics (one line each, :meth:`Rubric.line`), and the
  instruction to answer with one letter;
* a user message: the conversation being judged (each message as ``ROLE: content``), then
  ``Response A:`` and ``Response B:`` with the two replies;
* the assistant's answer: ``A`` or ``B`` — one token, whose probability is the judgement.

Replies are model output: they are cut at their first ``<|im_end|>``, any spelled-out reserved
chat token is defused (``<|`` becomes ``< |``) so it cannot close the message early, and a reply
longer than the critic's per-reply limit is cut to it (marked ``[...]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from k2.rl.critic.rubrics import Rubric
from k2.rl.tasks.base import strip_turn

CRITIC_INSTRUCTIONS = (
    "You are a critic. You read a conversation and two candidate replies to its last message, "
    "and decide which reply is better by these rubrics ('must' rubrics are hard requirements; "
    "the others count by their weight):"
)
QUESTION = "Which response is better? Answer with the single letter A or B."
ANSWERS = ("A", "B")
CUT_MARK = " [...]"


def defuse(text: str) -> str:
    """``text`` with any reserved chat token spelling broken up (``<|`` → ``< |``)."""
    return text.replace("<|", "< |")


def reply_of(text: str) -> str:
    """A sampled reply as the critic shows it: up to its first ``<|im_end|>``, defused, trimmed."""
    return defuse(strip_turn(text)).strip()


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return defuse(str(content)).strip()


def conversation_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The judged conversation as plain lines ``ROLE: content``."""
    return "\n".join(f"{m.get('role', 'user')}: {_content(m)}" for m in messages)


def critic_messages(messages: Sequence[Mapping[str, Any]], rubrics: Sequence[Rubric],
                    reply_a: str, reply_b: str) -> list[dict[str, str]]:
    """The critic's conversation comparing ``reply_a`` (shown as A) with ``reply_b`` (as B), the
    answer turn left for the critic. The replies are shown as given (see :func:`reply_of`)."""
    system = "\n".join([CRITIC_INSTRUCTIONS, *(r.line() for r in rubrics)])
    user = (f"Conversation:\n{conversation_text(messages)}\n\nResponse A:\n{reply_a}\n\n"
            f"Response B:\n{reply_b}\n\n{QUESTION}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]
