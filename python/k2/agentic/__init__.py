"""Tool use, end to end (docs/agentic.md): tool specs from typed methods, K2's tool-call format
parsed and rendered, stateful domains, a Gym-style environment with simulated users, tasks in
tau2-bench's format and their grading, and an MCP bridge in both directions.
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
from k2.agentic.env import AgentEnv, Observation, make_env
from k2.agentic.grading import ChainJudge, Grade, OpenAIJudge, ProgrammaticJudge, grade, initial_domain
from k2.agentic.mcp_bridge import McpDomain, serve_domain
from k2.agentic.tasks import Task, example_tasks, find_task, load_tasks, save_tasks
from k2.agentic.tools import ToolError, function_spec, tool
from k2.agentic.users import STOP, OpenAIUser, ProgrammaticUser

__all__ = [
    "AssistantTurn", "StreamingToolCallParser", "ToolCall", "assistant_message", "parse_assistant",
    "parse_tool_calls", "render_assistant", "render_tool_calls", "tool_message",
    "Domain", "ToolResult", "assertion", "domains", "get_domain", "make_domain", "register_domain",
    "AgentEnv", "Observation", "make_env",
    "ChainJudge", "Grade", "OpenAIJudge", "ProgrammaticJudge", "grade", "initial_domain",
    "McpDomain", "serve_domain",
    "Task", "example_tasks", "find_task", "load_tasks", "save_tasks",
    "ToolError", "function_spec", "tool",
    "STOP", "OpenAIUser", "ProgrammaticUser",
]
