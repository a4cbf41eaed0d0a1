"""Programmatic checks of mandatory rubrics, and the cap they put on a reward
(docs/critic.md, "Mandatory rubrics").

A check reads a reply's text (what the policy wrote, up to its first ``<|im_end|>``) and says
whether it breaks its rubric. The checks are deliberately narrow pattern matches: a false alarm
caps a good reply, so they look for the standard forms of the habit (``Great question!``,
``What an interesting question.``, ``I have fully answered your question.``), not for anything
that might be read that way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from k2.rl.tasks.base import strip_turn

_PRAISE_ADJ = (r"(?:great|good|excellent|fantastic|wonderful|interesting|insightful|thoughtful|"
               r"fascinating|brilliant|lovely|smart|clever|amazing|awesome|superb|"
               r"perceptive|astute|intriguing|profound|deep|neat|cool|terrific|nice|really good|"
               r"very good|really great|very interesting|really interesting)")
_PRAISE_NOUN = r"(?:question|query|point|thing to ask|thing to wonder about|topic|observation|one|ask)"
_OPENING_PRAISE = re.compile(
    r"^(?:"
    rf"(?:oh,?\s+|wow,?\s+|ah,?\s+)?(?:what|such)\s+an?\s+{_PRAISE_ADJ}\s+{_PRAISE_NOUN}"
    rf"|(?:that(?:'s|\s+is)|this\s+is|it(?:'s|\s+is))\s+(?:such\s+)?an?\s+{_PRAISE_ADJ}\s+{_PRAISE_NOUN}"
    rf"|(?:a\s+|an\s+)?{_PRAISE_ADJ}\s+{_PRAISE_NOUN}\b"
    rf"|(?:i\s+(?:really\s+)?(?:love|like|appreciate|enjoy))\s+(?:this|that|your)\s+(?:{_PRAISE_ADJ}\s+)?{_PRAISE_NOUN}"
    rf"|thanks?(?:\s+you)?\s+(?:so\s+much\s+)?for\s+(?:asking|(?:this|that|the|your|such\s+an?)\s+(?:{_PRAISE_ADJ}\s+)?{_PRAISE_NOUN})"
    rf"|you(?:'ve|\s+have)?\s+(?:asked|raised)\s+an?\s+{_PRAISE_ADJ}\s+{_PRAISE_NOUN}"
    rf"|(?:excellent|great|good)\s+(?:catch|thinking|asking)"
    r")",
    re.IGNORECASE,
)
_LEAD = re.compile(r"^[\s*_#>\"'`]+")

_SELF_JUSTIFICATION = re.compile(
    r"(?:"
    r"\b(?:this|my|the\s+above)\s+(?:answer|response|reply|explanation|solution)\s+(?:is|was|should\s+be)\s+"
    r"(?:clear|concise|correct|accurate|complete|comprehensive|helpful|thorough|well[- ]structured|"
    r"precise|exactly\s+what)"
    r"|\bi\s+(?:have|'ve)\s+(?:now\s+)?(?:carefully\s+|fully\s+|clearly\s+|thoroughly\s+|directly\s+|concisely\s+)?"
    r"(?:answered|addressed|explained|covered|fulfilled|met)\s+(?:your|the|all)"
    r"|\b(?:this|which|that)\s+(?:fully|directly|clearly|completely|precisely)\s+(?:answers|addresses|"
    r"fulfills|fulfils|meets|satisfies)\s+(?:your|the)"
    r"|\b(?:this|my)\s+(?:answer|response|reply)\s+(?:fully\s+)?(?:meets|satisfies|fulfills|fulfils)\s+"
    r"(?:your|the|all)"
    r")",
    re.IGNORECASE,
)


def reply_text(text: str) -> str:
    """The reply itself: the text before the first ``<|im_end|>``."""
    return strip_turn(text)


def opening_praise(text: str) -> bool:
    """Whether the reply opens by praising the question or the user (``Great question!``)."""
    head = _LEAD.sub("", reply_text(text))[:200]
    return bool(_OPENING_PRAISE.match(head))


def self_justification(text: str) -> bool:
    """Whether the reply argues for itself (``This answer is clear and correct.``, ``I have
    fully answered your question.``) anywhere in its text."""
    return bool(_SELF_JUSTIFICATION.search(reply_text(text)))


CHECKS: dict[str, Callable[[str], bool]] = {
    "opening_praise": opening_praise,
    "self_justification": self_justification,
}
"""Programmatic checks by name: ``check(reply_text) -> True`` when the reply breaks the rubric."""


def violations(text: str, rubrics: Sequence) -> list[str]:  # Sequence[Rubric]
    """Ids of the mandatory rubrics with a check that ``text`` breaks."""
    return [r.id for r in rubrics if r.mandatory and r.check is not None and CHECKS[r.check](text)]


def cap_rewards(rewards: Sequence[float], broken: Sequence[Sequence[str]], cap: float) -> list[float]:
    """Each reward, lowered to at most ``cap`` where its reply broke a mandatory rubric
    (``broken[i]`` non-empty)."""
    if len(rewards) != len(broken):
        raise ValueError(f"{len(rewards)} rewards but {len(broken)} violation lists")
    return [min(r, cap) if b else r for r, b in zip(rewards, broken)]
