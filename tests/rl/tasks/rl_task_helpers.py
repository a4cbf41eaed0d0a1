"""Hostile and random response texts for the k2.rl.tasks verifier fuzz tests."""

from __future__ import annotations

import random

SPECIALS = ["<|im_end|>", "<|im_assistant|>", "<|tool_calls_section_begin|>", "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>", "###STOP###"]

HOSTILE = [
    "",
    " ",
    "\x00" * 50,
    "Answer:",
    "Answer: ",
    "answer: -",
    "Answer: " + "9" * 5000,  # past int()'s digit limit
    "Answer: " + "1" * 300,
    "Answer: 1e309",
    "Answer: nan",
    "Answer: inf",
    "Answer: 9**9**9**9",
    "Answer: __import__('os').system('echo pwned')",
    "Answer: (lambda: 1)()",
    "Answer: [1, 2][0]",
    "Answer: 1 if 1 else 2",
    "Answer: " + "(" * 5000 + "1" + ")" * 5000,
    "Answer: " + "1+" * 100_000 + "1",
    "Answer: " + "-" * 10_000 + "1",
    "Answer: 1/0",
    "Answer: 0/0",
    "Answer: 10 / (5 - 5)",
    "Answer: \ud800\udfff",
    "Answer: \u0661\u0662",  # Arabic-Indic digits
    "Answer: １２",  # full-width digits
    "Answer: True",
    "Answer: -0",
    "Answer: 1_000",
    "Answer: 0x10",
    "<answer>" * 1000,
    "<answer>\ud800</answer>",
    "<answer>" + "x" * 200_000 + "</answer>",
    "```python\n" + "(" * 10_000 + "\n```",
    "```python\nimport os\nos.kill(os.getppid(), 9)\n```",
    "```python\nwhile True: pass\n```",
    "```python\n\x00\n```",
    "```\n```",
    "```python",
    "x" * 2_000_000,
    "\n" * 100_000,
    "Answer: 1\n" * 10_000,
    "".join(SPECIALS) * 100,
    "\U0001F600" * 1000 + "Answer: 😀",
    "**Answer:** **",
]


def random_texts(seed: int, count: int) -> list[str]:
    """``count`` random strings: printable junk, random code points (surrogates included),
    fragments of the answer formats and reserved tokens, at lengths up to a few thousand."""
    rng = random.Random(seed)
    pieces = ["Answer:", "answer: ", "<answer>", "</answer>", "```python\n", "```", "\n", " ", "=", "+", "-", "*",
              "/", "(", ")", "**", "def f():\n    return 1\n", *SPECIALS] + [str(rng.randrange(-999, 1000)) for _ in range(20)]
    out = []
    for _ in range(count):
        mode = rng.randrange(3)
        n = rng.choice([1, 5, 50, 500, 5000])
        if mode == 0:
            out.append("".join(rng.choice(pieces) for _ in range(n)))
        elif mode == 1:
            out.append("".join(chr(rng.randrange(0x110000)) for _ in range(n)))
        else:
            out.append(bytes(rng.randrange(256) for _ in range(n)).decode("latin-1"))
    return out
