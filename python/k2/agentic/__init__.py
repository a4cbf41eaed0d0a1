"""Tool use, end to end: tool specs, stateful domains, environments, tau2-format tasks and their
grading, and an MCP bridge (docs/agentic.md).
"""

from k2.agentic.calls import (
    AssistantTurn,
    StreamingToolCallParser,
    ToolCall,
    assistant_message,
    parse_assistant,
    parse_tool_calls,
    render_assistant,
    render_tool_calls,
    tool_message,
)
from k2.agentic.domain import Domain, ToolResult, assertion, domains, get_domain, make_domain, register_domain
from k2.agentic.tools import ToolError, function_spec, tool

__all__ = [
    "AssistantTurn", "StreamingToolCallParser", "ToolCall", "assistant_message", "parse_assistant",
    "parse_tool_calls", "render_assistant", "render_tool_calls", "tool_message",
    "Domain", "ToolResult", "assertion", "domains", "get_domain", "make_domain", "register_domain",
    "ToolError", "function_spec", "tool",
]
