"""K2 tool-call parsing and rendering against hand-written K2-format strings (docs/chat-format.md)."""

from __future__ import annotations

import json

import pytest

from k2.agentic import (
    StreamingToolCallParser,
    ToolCall,
    assistant_message,
    parse_assistant,
    parse_tool_calls,
    render_assistant,
)
from k2.agentic.calls import calls_from_message
from k2.data import render_chat

B, E = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

TWO_CALLS = (
    "Let me check both."
    "<|tool_calls_section_begin|>"
    '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
    '<|tool_call_begin|>functions.search:1<|tool_call_argument_begin|>{"q": "a {b} \\"c\\" }{", "n": [1, {"d": "}"}]}<|tool_call_end|>'
    "<|tool_calls_section_end|>"
)


def test_hand_written_section_with_tricky_json() -> None:
    turn = parse_assistant(TWO_CALLS + "<|im_end|>")
    assert turn.content == "Let me check both." and not turn.truncated
    assert [(c.name, c.id, c.arguments, c.error) for c in turn.calls] == [
        ("get_weather", "functions.get_weather:0", {"city": "Paris"}, None),
        ("search", "functions.search:1", {"q": 'a {b} "c" }{', "n": [1, {"d": "}"}]}, None),
    ]
    assert turn.calls[1].index == 1


def test_rendering_is_the_inverse() -> None:
    calls = parse_tool_calls(TWO_CALLS)
    assert render_assistant("Let me check both.", calls) == TWO_CALLS
    fresh = [ToolCall("get_weather", {"city": "Paris"}), ToolCall("lookup", {"x": [1, 2]})]
    text = render_assistant("", fresh, start=4)
    assert text == (
        B + CB + 'functions.get_weather:4' + AB + '{"city": "Paris"}' + CE
        + CB + "functions.lookup:5" + AB + '{"x": [1, 2]}' + CE + E
    )
    again = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in again] == [("get_weather", {"city": "Paris"}), ("lookup", {"x": [1, 2]})]


def test_no_section_is_plain_content() -> None:
    turn = parse_assistant("Sure, it is 18 °C in {Paris}.<|im_end|>")
    assert turn.content == "Sure, it is 18 °C in {Paris}." and turn.calls == [] and not turn.truncated


def test_section_cut_off_by_the_token_budget() -> None:
    text = TWO_CALLS.removesuffix(E)
    turn = parse_assistant(text)
    assert turn.truncated and [c.error for c in turn.calls] == [None, None]
    cut = B + CB + "functions.a:0" + AB + '{"x": 1}' + CE + CB + "functions.b:1" + AB + '{"y": '
    turn = parse_assistant(cut)
    assert turn.truncated and turn.calls[0].arguments == {"x": 1}
    assert turn.calls[1].name == "b" and "cut off" in turn.calls[1].error and "functions.b:1" in turn.calls[1].error


def test_bad_arguments_name_the_call() -> None:
    text = B + CB + "functions.pay:0" + AB + "{amount: 5}" + CE + CB + "functions.pay:1" + AB + "[1, 2]" + CE + E
    first, second = parse_tool_calls(text)
    assert first.arguments is None and "functions.pay:0" in first.error and "not valid JSON" in first.error
    assert second.arguments is None and "functions.pay:1" in second.error and "object" in second.error
    missing = parse_tool_calls(B + CB + "functions.pay:0" + CE + E)[0]
    assert missing.arguments is None and "<|tool_call_argument_begin|>" in missing.error
    empty = parse_tool_calls(B + CB + "functions.ping:0" + AB + CE + E)[0]
    assert empty.arguments == {} and empty.error is None


def test_streaming_yields_each_call_at_its_end_token() -> None:
    expected = [(c.name, c.arguments) for c in parse_tool_calls(TWO_CALLS)]
    first_end = TWO_CALLS.index(CE) + len(CE)
    for size in (1, 2, 3, 7, 1000):
        parser = StreamingToolCallParser()
        got, yielded_at = [], []
        for at in range(0, len(TWO_CALLS), size):
            piece = TWO_CALLS[at : at + size]
            for call in parser.feed(piece):
                got.append((call.name, call.arguments))
                yielded_at.append(at + len(piece))
        assert got == expected
        assert yielded_at[0] >= first_end and yielded_at[0] - first_end < size
        assert parser.content == "Let me check both."
        final = parser.close()
        assert [(c.name, c.arguments) for c in final.calls] == expected
    parser = StreamingToolCallParser()
    parser.feed("Hello <|tool_ca")
    assert parser.content == "Hello "


def test_openai_messages_in_and_out() -> None:
    turn = parse_assistant(TWO_CALLS)
    message = assistant_message(turn)
    assert message == {
        "role": "assistant",
        "content": "Let me check both.",
        "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "functions.search:1", "type": "function",
             "function": {"name": "search", "arguments": turn.calls[1].raw_arguments}},
        ],
    }
    back = calls_from_message(message)
    assert [(c.name, c.arguments, c.id) for c in back] == [(c.name, c.arguments, c.id) for c in turn.calls]
    # dict arguments (Hugging Face style) are accepted too
    hf = calls_from_message({"tool_calls": [{"id": "x", "function": {"name": "f", "arguments": {"a": 1}}}]})
    assert hf[0].arguments == {"a": 1} and json.loads(hf[0].raw_arguments) == {"a": 1}
    # and k2's chat template renders the OpenAI message to exactly the sampled text
    rendered = render_chat([message])
    assert rendered == "<|im_assistant|>assistant<|im_middle|>" + TWO_CALLS + "<|im_end|>"


def test_chat_template_round_trip_through_the_real_tokenizer(tokenizer) -> None:
    calls = [ToolCall("transfer", {"from_account": "acc-1", "amount_cents": 5, "memo": 'rent "May" {x}'}),
             ToolCall("get_account", {"account_id": "acc-ü"})]
    messages = [
        {"role": "user", "content": "move it"},
        {"role": "assistant", "content": "On it.", "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(calls)]},
        {"role": "tool", "tool_call_id": "call_0", "content": "{}"},
        {"role": "tool", "tool_call_id": "call_1", "content": "{}"},
    ]
    text = render_chat(messages)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.token_to_id(CB) in ids and tokenizer.token_to_id(CE) in ids
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    assert decoded == text
    turn_text = decoded.split("<|im_assistant|>assistant<|im_middle|>", 1)[1]
    parsed = parse_assistant(turn_text)
    assert parsed.content == "On it."
    assert [(c.name, c.arguments, c.id) for c in parsed.calls] == [
        ("transfer", calls[0].arguments, "functions.transfer:0"),
        ("get_account", calls[1].arguments, "functions.get_account:1"),
    ]
    assert "## Return of functions.transfer:0\n{}" in decoded


@pytest.mark.parametrize("bad", [{"function": {}}, {"function": {"name": "f", "arguments": 3}}])
def test_malformed_openai_calls_fail_clearly(bad) -> None:
    from k2.errors import AgenticError

    with pytest.raises(AgenticError):
        calls_from_message({"tool_calls": [bad]})
