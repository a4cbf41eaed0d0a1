"""K2's chat and tool-call format, as a Jinja chat template (docs/chat-format.md).

A message is ``<|im_ROLE|>NAME<|im_middle|>CONTENT<|im_end|>``, with ROLE ``system``, ``user``
or ``assistant`` and NAME the message's ``name`` if it has one, else its role. Tool
declarations come first, as a system message named ``tool_declare`` whose content is the tools'
JSON. An assistant's tool calls close its content inside
``<|tool_calls_section_begin|>`` ... ``<|tool_calls_section_end|>``, each call written
``<|tool_call_begin|>functions.NAME:COUNTER<|tool_call_argument_begin|>JSON<|tool_call_end|>``,
where COUNTER numbers the calls from 0 over the whole dialog. A tool result (role ``tool``) is a
system-side message named ``tool`` whose content starts ``## Return of CALL_ID`` and a newline;
its ``tool_call_id`` may be the call's own ``id`` (as OpenAI-style messages carry it), which the
template turns into that call's ``functions.NAME:COUNTER``.

Messages use the Hugging Face layout (``{"role", "content", "tool_calls": [{"id", "function":
{"name", "arguments"}}]}``, arguments a dict or a JSON string), so the template in
``tokenizer_config.json`` works with ``transformers``' ``apply_chat_template`` and with
:func:`render_chat`, which renders it the same way without transformers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
  {%- if content is string -%}{{ content }}
  {%- elif content -%}
    {%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- set counter = namespace(calls=0) -%}
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- set role = message['role'] -%}
  {%- set side = 'system' if role == 'tool' else role -%}
  <|im_{{ side }}|>{{ message.get('name') or role }}<|im_middle|>
  {%- if role == 'tool' -%}
    {%- set found = namespace(id=message.get('tool_call_id'), n=0) -%}
    {%- for earlier in messages if earlier['role'] == 'assistant' and earlier.get('tool_calls') -%}
      {%- for call in earlier['tool_calls'] -%}
        {%- set fn = call.get('function') or call -%}
        {%- if call.get('id') is not none and call.get('id') == message.get('tool_call_id') -%}
          {%- set found.id = 'functions.' ~ fn['name'] ~ ':' ~ found.n -%}
        {%- endif -%}
        {%- set found.n = found.n + 1 -%}
      {%- endfor -%}
    {%- endfor -%}
    ## Return of {{ found.id }}{{ '\n' }}
  {%- endif -%}
  {{- render_content(message.get('content')) -}}
  {%- if role == 'assistant' and message.get('tool_calls') -%}
    <|tool_calls_section_begin|>
    {%- for call in message['tool_calls'] -%}
      {%- set fn = call.get('function') or call -%}
      <|tool_call_begin|>functions.{{ fn['name'] }}:{{ counter.calls }}<|tool_call_argument_begin|>
      {%- if fn['arguments'] is string -%}{{ fn['arguments'] }}
      {%- else -%}{{ fn['arguments'] | tojson }}
      {%- endif -%}
      <|tool_call_end|>
      {%- set counter.calls = counter.calls + 1 -%}
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
""".strip()
"""The chat template shipped in ``tokenizer_config.json``."""


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """The ``tojson`` filter as transformers defines it (no HTML escaping, UTF-8 kept)."""
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.cache
def _compiled_template() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    return env.from_string(CHAT_TEMPLATE)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """Render a conversation in K2's chat format.

    Args:
        messages: dicts with ``role`` (system, user, assistant, tool), ``content`` (a string or
            a list of ``{"type": "text", "text": ...}`` parts), and optionally ``name``,
            ``tool_calls`` (assistant) and ``tool_call_id`` (tool).
        tools: tool declarations (JSON-Schema function specs), rendered as a ``tool_declare``
            system message first.
        add_generation_prompt: end with an open assistant turn for the model to complete.

    Returns:
        The rendered text, special tokens spelled out.
    """
    return _compiled_template().render(
        messages=list(messages),
        tools=list(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
    )
