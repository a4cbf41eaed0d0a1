"""Schema-constrained tool calls (k2.agentic.constrain): from an untrained model, every call a
constrained row writes parses with k2.agentic's parser, names a declared tool and validates with
jsonschema, over many random schemas; unconstrained rows of the same model do not."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from k2.agentic.calls import parse_assistant  # noqa: E402
from k2.agentic.constrain import ToolCallConstrainer  # noqa: E402
from k2.errors import AgenticError  # noqa: E402
from k2.model import K2ForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_helpers import small_config  # noqa: E402

OPEN = "<|im_assistant|>assistant<|im_middle|>"
SECTION = "<|tool_calls_section_begin|>"


def random_schema(rng: random.Random) -> dict:
    """An object schema with string/integer/number/boolean/enum/array/nested-object properties and a
    random required subset; lengths are bounded so that an untrained model can finish a call."""
    props = {}
    for i in range(rng.randint(0, 4)):
        kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array", "object"])
        if kind == "string":
            prop = {"type": "string", "maxLength": rng.randint(1, 6)}
        elif kind == "integer":
            prop = {"type": "integer", "minimum": rng.randint(-50, 0), "maximum": rng.randint(1, 500)}
        elif kind == "number":
            prop = {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000])}
        elif kind == "boolean":
            prop = {"type": "boolean"}
        elif kind == "enum":
            prop = {"enum": rng.sample(["red", "green", "blue", "a b", 'q"t'], rng.randint(1, 3))}
        elif kind == "object":
            prop = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"enum": [1, 2]}},
                    "required": rng.sample(["a", "b"], rng.randint(0, 2)), "additionalProperties": False}
        else:
            item = rng.choice([{"type": "integer", "minimum": 0, "maximum": 99},
                               {"type": "string", "maxLength": 3}, {"type": "boolean"}])
            prop = {"type": "array", "items": item, "maxItems": rng.randint(1, 3)}
        props[f"{rng.choice(['id', 'when', 'n', 'x'])}_{i}"] = prop
    required = [k for k in props if rng.random() < 0.5]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def random_tools(rng: random.Random, n: int, tag: str) -> list[dict]:
    return [
        {"type": "function", "function": {"name": f"{tag}_{rng.choice(['get', 'put', 'find'])}{j}",
                                          "description": "a tool", "parameters": random_schema(rng)}}
        for j in range(n)
    ]


def call_problems(text: str, tools: list[dict], budget_hit: bool) -> list[str]:
    """What is wrong with the calls of a sampled turn: a finished call must parse, name a declared
    tool and validate; a call cut off (only when the token budget ran out) must have a header that
    begins a declared ``functions.NAME:N``."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    turn = parse_assistant(text)
    problems = []
    for call in turn.calls:
        if call.error and "cut off" in call.error:
            ok_header = any(
                f"functions.{name}:".startswith(call.id) or re.fullmatch(rf"functions\.{re.escape(name)}:\d+", call.id)
                for name in schemas
            )
            if not (budget_hit and ok_header and call is turn.calls[-1]):
                problems.append(f"cut off: {call.id!r}")
            continue
        if call.error:
            problems.append(call.error)
        elif call.name not in schemas:
            problems.append(f"undeclared tool {call.name!r}")
        else:
            errors = list(jsonschema.Draft202012Validator(schemas[call.name]).iter_errors(call.arguments))
            problems += [f"{call.name}: {e.message}" for e in errors]
    return problems


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = small_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=256, rope_scaling=None)
    return K2ForCausalLM(config)


def sample(model, tokenizer, prompt: str, rows: int, tools, constrained: bool, seed: int, max_new: int):
    ids = tokenizer.encode(prompt).ids
    constraints = None
    if constrained:
        constrainer = ToolCallConstrainer(tokenizer)
        constraints = [constrainer.row(tools, ids) for _ in range(rows)]
    out = model.generate([ids] * rows, max_new_tokens=max_new, temperature=1.0,
                         stop_tokens=[tokenizer.token_to_id("<|im_end|>")], constraints=constraints,
                         generator=torch.Generator().manual_seed(seed))
    return [(tokenizer.decode(o, skip_special_tokens=False), len(o) == max_new) for o in out]


def check_random_schemas(model, tokenizer, sets: int, rows: int, seed: int, max_new: int = 80) -> int:
    rng = random.Random(seed)
    complete = 0
    for s in range(sets):
        tools = random_tools(rng, 3, f"t{s}")
        for text, budget_hit in sample(model, tokenizer, OPEN + SECTION, rows, tools, True, s, max_new):
            text = SECTION + text
            assert call_problems(text, tools, budget_hit) == [], (text, tools)
            complete += sum(c.error is None for c in parse_assistant(text).calls)
    return complete


def test_constrained_calls_are_valid_from_an_untrained_model(model, tokenizer):
    assert check_random_schemas(model, tokenizer, 2, 4, seed=1, max_new=60) >= 4


@pytest.mark.slow
def test_constrained_calls_are_valid_over_many_random_schemas(model, tokenizer):
    assert check_random_schemas(model, tokenizer, 12, 8, seed=2) >= 60  # 36 schemas, 96 rows


def test_unconstrained_calls_from_the_same_model_are_invalid(model, tokenizer):
    rng = random.Random(1)
    tools = random_tools(rng, 3, "t0")
    results = sample(model, tokenizer, OPEN + SECTION + "<|tool_call_begin|>", 4, tools, False, 0, 40)
    bad = [call_problems(SECTION + "<|tool_call_begin|>" + text, tools, hit) for text, hit in results]
    assert all(bad), bad


def test_gold_calls_pass_the_masks(tokenizer):
    """Every token of a correctly written call is allowed (the constraint does not over-restrict),
    the counter continues the prompt's, and the turn must end after the section."""
    rng = random.Random(3)
    tools = random_tools(rng, 2, "g")
    tools[0]["function"]["parameters"] = {
        "type": "object", "properties": {"who": {"type": "string"}, "n": {"type": "integer"},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["who"], "additionalProperties": False,
    }
    name = tools[0]["function"]["name"]
    constrainer = ToolCallConstrainer(tokenizer)
    prompt = tokenizer.encode(OPEN + SECTION + "<|tool_call_begin|>functions.x:0<|tool_call_argument_begin|>{}"
                              "<|tool_call_end|><|tool_calls_section_end|><|im_end|>" + OPEN).ids
    row = constrainer.row(tools, prompt)
    args = json.dumps({"who": "Ann \"O\" é", "n": -12, "tags": ["a", "b c"]})  # declared order
    gold = (f"Sure.{SECTION}<|tool_call_begin|>functions.{name}:1<|tool_call_argument_begin|>{args}"
            "<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
    vocab = tokenizer.get_vocab_size() + 5
    for token in tokenizer.encode(gold).ids:
        mask = row.allowed_mask(vocab)
        assert mask.shape == (vocab,) and bool(mask[token]), tokenizer.decode([token], skip_special_tokens=False)
        row.advance(token)
    assert row.calls == 1 and row.state == "free"


def test_masks_by_state(tokenizer):
    constrainer = ToolCallConstrainer(tokenizer)
    tid = tokenizer.token_to_id
    tools = random_tools(random.Random(0), 1, "m")
    vocab = tokenizer.get_vocab_size()
    free = constrainer.row(tools, tokenizer.encode(OPEN).ids).allowed_mask(vocab)
    assert free[tid("<|tool_calls_section_begin|>")] and free[tid("<|im_end|>")] and free[200]
    for token in ("<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>",
                  "<|tool_calls_section_end|>"):
        assert not free[tid(token)]
    assert not constrainer.row(None, [1]).allowed_mask(vocab)[tid("<|tool_calls_section_begin|>")]
    first = constrainer.row(tools, tokenizer.encode(OPEN + SECTION).ids).allowed_mask(vocab)
    assert first.nonzero().flatten().tolist() == [tid("<|tool_call_begin|>")]
    in_call = constrainer.row(tools, tokenizer.encode(OPEN + SECTION + "<|tool_call_begin|>").ids)
    assert in_call.counter == 1
    # only the header's first bytes: 'f', 'fu', ... or 'functions' as tokens
    allowed = [tokenizer.decode([t]) for t in in_call.allowed_mask(vocab).nonzero().flatten().tolist()]
    assert allowed and all("functions.".startswith(a) or a.startswith("functions.") for a in allowed)


def test_bad_input_is_named(tokenizer):
    constrainer = ToolCallConstrainer(tokenizer)
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(?<=a)b"}}}}}]
    with pytest.raises(AgenticError, match="cannot compile the call grammar of tools f"):
        constrainer.row(bad, tokenizer.encode(OPEN + SECTION + "<|tool_call_begin|>").ids)
    tools = random_tools(random.Random(0), 1, "m")
    with pytest.raises(AgenticError, match="does not fit the declared tools"):
        constrainer.row(tools, tokenizer.encode(OPEN + SECTION + "<|tool_call_begin|>functions.nope").ids)
    with pytest.raises(AgenticError, match="needs declared tools"):
        constrainer.row(None, tokenizer.encode(OPEN + SECTION).ids)
    with pytest.raises(AgenticError, match="unique"):
        constrainer.row(tools + tools, [1])


def test_every_valid_gold_call_of_a_synthesis_run_passes_the_masks(tokenizer, tmp_path):
    """The constraint never rejects what the training data write: every schema-valid gold call of
    a small `k2 synth` run (real evolved tool variants: patterns, enums, ranges, optional
    parameters; the dialog's call counter) is allowed token by token, and closes the call."""
    from k2.agentic.evaluate import SchemaChecker, next_call_items
    from k2.agentic.synth import SynthOptions, synthesize

    synthesize(SynthOptions(n=30, seed=1, validation=0.3), tmp_path)
    constrainer, checker = ToolCallConstrainer(tokenizer), SchemaChecker()
    vocab = tokenizer.get_vocab_size()
    checked = 0
    for split in ("train", "validation"):
        for line in (tmp_path / f"{split}.jsonl").read_text().splitlines():
            for item in next_call_items(json.loads(line)):
                if not checker.valid(item.gold, item.tools):
                    continue  # a planted mistake (corrected in the next turn)
                ids = tokenizer.encode(item.prompt).ids
                row = constrainer.row(item.tools, ids)
                rest = (f"functions.{item.gold.name}:{row.counter - 1}<|tool_call_argument_begin|>"
                        f"{item.gold.raw_arguments}<|tool_call_end|>")
                for token in tokenizer.encode(rest).ids:
                    assert row.allowed_mask(vocab)[token], (rest, tokenizer.decode([token]))
                    row.advance(token)
                assert row.state == "between" and row.calls == 1
                checked += 1
    assert checked >= 40


@pytest.mark.slow
def test_every_evolved_tool_variant_compiles(tokenizer):
    """Each of the synthesis pool's 2,760 tool specs gets a call grammar."""
    from k2.agentic import domains
    from k2.agentic.synth import VariantPool

    pool = VariantPool(domains(), seed=0)
    constrainer = ToolCallConstrainer(tokenizer)
    specs = [v.spec for v in pool.variants.values()]
    assert len(specs) >= 2000
    for spec in specs:
        constrainer.grammar([spec]).matcher(0)


def test_grammar_cache_is_bounded(tokenizer, monkeypatch):
    import k2.agentic.constrain as constrain

    monkeypatch.setattr(constrain, "MAX_TOOL_SETS", 2)
    constrainer = ToolCallConstrainer(tokenizer)
    a, b, c = (random_tools(random.Random(i), 1, f"c{i}") for i in range(3))
    ga = constrainer.grammar(a)
    constrainer.grammar(b)
    assert constrainer.grammar(a) is ga  # a is now the most recent
    constrainer.grammar(c)  # drops b
    assert constrainer.grammar(a) is ga and len(constrainer._grammars) == 2
