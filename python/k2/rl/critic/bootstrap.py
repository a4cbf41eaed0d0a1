"""The critic's bootstrap: synthesized preference pairs, one reply following the rubrics and one
breaking one, as a chat SFT mix (docs/critic.md, "Bootstrap").

Replies are built from problems whose right answer is known, so which reply is better is known:

* arithmetic prompts (:class:`k2.rl.tasks.arithmetic.ArithmeticTask`, train split): a good reply
  (``Answer: N``, or one line of working then ``Answer: N``) against the same reply opening with
  praise of the question, the same reply with a sentence of self-justification, a wrong answer,
  or no answer line;
* the arithmetic questions of the bait set (:mod:`k2.rl.critic.bait`, train split): a direct
  answer against the same answer opening with praise, or with self-justification.

:func:`critic_conversations` turns each pair into two chat conversations — the critic prompt with
the good reply shown as A and answer ``A``, and shown as B and answer ``B`` — in the OpenAI
format ``k2 sft --data`` reads (``k2 critic bootstrap --out FILE`` writes them as JSONL).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from k2.rl.critic.bait import BaitPrompts
from k2.rl.critic.closed_loop import Preference
from k2.rl.critic.prompt import ANSWERS, critic_messages
from k2.rl.critic.rubrics import rubrics_for

PRAISE_OPENINGS = ("Great question! ", "What an interesting question. ", "That's a really good question! ",
                   "Excellent question. ", "Thanks for asking such a thoughtful question! ",
                   "What a fascinating question! ")
JUSTIFICATIONS = (" This answer is clear and correct.", " I have fully answered your question.",
                  " This directly answers your question.", " My response is concise and accurate.")
FLAWS = ("praise", "justification", "wrong", "missing")
"""What a synthesized bad reply breaks: opening praise, self-justification, a wrong answer, no
answer line (the last two only on arithmetic prompts)."""

_BAIT_SUM = re.compile(r"what is (\d+) ([-+*]) (\d+)(?: ([-+*]) (\d+))?\?", re.IGNORECASE)


def _good_arithmetic(rng: random.Random, expression: str, answer: int) -> str:
    return f"Answer: {answer}" if rng.random() < 0.5 else f"{expression} = {answer}\nAnswer: {answer}"


def _bad(rng: random.Random, good: str, flaw: str, answer: int | None, expression: str | None) -> str:
    if flaw == "praise":  # on a line of its own before an arithmetic reply, so 'Answer:' still starts one
        return rng.choice(PRAISE_OPENINGS) + good if answer is None else rng.choice(PRAISE_OPENINGS).strip() + "\n" + good
    if flaw == "justification":
        return good + "\n" + rng.choice(JUSTIFICATIONS).strip()
    assert answer is not None and expression is not None
    if flaw == "wrong":
        wrong = answer + rng.choice([-1, 1]) * rng.randint(1, 9)
        return _good_arithmetic(rng, expression, wrong)
    return rng.choice([f"{expression} is easy to work out.", "Let me think about it.",
                       f"The value of {expression} is a whole number."])


def _bait_answer(question: str) -> str | None:
    from k2.rl.tasks.arithmetic import evaluate

    m = _BAIT_SUM.search(question)
    if not m:
        return None
    groups = [g for g in m.groups() if g is not None]
    operands = [int(x) for x in groups[0::2]]
    ops = groups[1::2]
    expression = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:])])
    return f"{expression} = {evaluate(operands, ops)}."


def synthesize_pairs(n: int, seed: int = 0, *, level: int = 2, bait_share: float = 0.25) -> list[Preference]:
    """``n`` synthesized preference pairs (winner follows the rubrics, loser breaks one), a
    ``bait_share`` of them on the bait set's arithmetic questions; the same for the same seed.
    ``Preference.loser_score`` is 0 and ``winner_score`` 1; ``prompt_id`` ends with ``#FLAW``."""
    from k2.rl.tasks.arithmetic import ArithmeticTask

    rng = random.Random(f"k2.rl.critic.bootstrap:{seed}")
    task = ArithmeticTask(level=level)
    n_bait = round(n * bait_share)
    bait_pool = [(p, a) for p in BaitPrompts().prompts("train", len(BaitPrompts().split["train"]), seed=0)
                 if (a := _bait_answer(p.hidden["question"])) is not None]
    out: list[Preference] = []
    for i, p in enumerate(task.prompts("train", n - (n_bait if bait_pool else 0), seed=seed)):
        flaw = FLAWS[i % len(FLAWS)]
        expression, answer = p.hidden["expression"], int(p.hidden["answer"])
        good = _good_arithmetic(rng, expression, answer)
        out.append(Preference(f"{p.id}#{flaw}", list(p.messages), good,
                              _bad(rng, good, flaw, answer, expression), 1.0, 0.0))
    if bait_pool:
        for i in range(n_bait):
            p, good = bait_pool[rng.randrange(len(bait_pool))]
            flaw = FLAWS[i % 2]
            out.append(Preference(f"{p.id}#{flaw}", list(p.messages), good, _bad(rng, good, flaw, None, None),
                                  1.0, 0.0))
    rng.shuffle(out)
    return out


def task_of(pair: Preference) -> str:
    """The rubric set a synthesized pair is judged by (``bait`` or ``arithmetic``)."""
    return "bait" if pair.prompt_id.startswith("bait/") else "arithmetic"


def critic_conversations(pairs: Sequence[Preference], rubrics_file: str | None = None) -> list[dict[str, Any]]:
    """Each pair as two SFT conversations (``{"messages": [...]}``): the better reply shown as A
    with the answer ``A``, and shown as B with the answer ``B``."""
    cache: dict[str, list] = {}
    out = []
    for p in pairs:
        task = task_of(p)
        rubrics = cache.setdefault(task, rubrics_for(task, file=rubrics_file))
        for first_as_a, letter in ((True, ANSWERS[0]), (False, ANSWERS[1])):
            a, b = (p.winner, p.loser) if first_as_a else (p.loser, p.winner)
            messages = critic_messages(p.messages, rubrics, a, b)
            out.append({"messages": [*messages, {"role": "assistant", "content": letter}]})
    return out


def write_bootstrap(out: str | Path, n: int, seed: int = 0, *, level: int = 2, bait_share: float = 0.25,
                    rubrics_file: str | None = None) -> int:
    """Write :func:`critic_conversations` of :func:`synthesize_pairs` as JSONL; returns the
    number of conversations (2 per pair)."""
    rows = critic_conversations(synthesize_pairs(n, seed, level=level, bait_share=bait_share), rubrics_file)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)
