"""K2's chat template (docs/chat-format.md), rendered by k2 and by transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2.data import PrepareOptions, SPECIAL_TOKENS, load_tokenizer, prepare, render_chat

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "18 °C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "9 °C"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_c",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Rome"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_c", "content": "24 °C"},
    {"role": "assistant", "content": "Paris 18, Oslo 9, Rome 24.", "name": "kimi"},
    {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
]

EXPECTED = (
    "<|im_system|>tool_declare<|im_middle|>"
    '[{"type": "function", "function": {"name": "get_weather", '
    '"description": "Current weather", "parameters": {"type": "object", "properties": {"city": '
    '{"type": "string"}}}}}]<|im_end|>'
    "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
    "<|im_user|>user<|im_middle|>Weather in Paris and Oslo?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>Checking.<|tool_calls_section_begin|>"
    "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris"}<|tool_call_end|>'
    "<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>"
    '{"city": "Oslo"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
    "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n18 °C<|im_end|>"
    "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:1\n9 °C<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>"
    "<|tool_call_begin|>functions.get_weather:2<|tool_call_argument_begin|>"
    '{"city": "Rome"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
    "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:2\n24 °C<|im_end|>"
    "<|im_assistant|>kimi<|im_middle|>Paris 18, Oslo 9, Rome 24.<|im_end|>"
    "<|im_user|>user<|im_middle|>Thanks!<|im_end|>"
)


def test_render_chat_matches_the_hand_written_k2_format() -> None:
    assert render_chat(MESSAGES, tools=TOOLS) == EXPECTED
    opened = render_chat(MESSAGES[:2], add_generation_prompt=True)
    assert opened == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Paris and Oslo?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, request) -> Path:
    corpus = tmp_path_factory.mktemp("chat-corpus")
    for i in range(8):
        (corpus / f"{i}.txt").write_text(f"Weather report {i}: sunny, {i} degrees in Paris.\n" * 20)
    out = tmp_path_factory.mktemp("chat-out")
    prepare(PrepareOptions(corpus=[corpus], out_dir=out, vocab_size=300, val_fraction=0.3))
    return out


def test_special_tokens_encode_as_single_ids(prepared: Path) -> None:
    tokenizer = load_tokenizer(prepared)
    ids = tokenizer.encode(EXPECTED, add_special_tokens=False).ids
    for token in SPECIAL_TOKENS[2:]:
        assert EXPECTED.count(token) == ids.count(tokenizer.token_to_id(token)), token
    assert tokenizer.decode(ids, skip_special_tokens=False) == EXPECTED


@pytest.mark.slow
def test_transformers_loads_the_tokenizer_and_renders_the_same_chat(prepared: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(prepared)
    assert hf.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False) == EXPECTED
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    assert (
        hf.encode(EXPECTED, add_special_tokens=False)
        == load_tokenizer(prepared).encode(EXPECTED, add_special_tokens=False).ids
    )
