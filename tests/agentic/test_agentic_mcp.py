"""MCP both ways, for real: k2's McpDomain client against `k2 env serve-mcp` in a subprocess."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import k2
from k2.agentic import McpDomain, example_tasks, grade, make_domain, make_env
from k2.agentic import ToolCall, render_assistant
from k2.errors import AgenticError

HERE = Path(__file__).parent


def _env() -> dict[str, str]:
    """The server subprocess imports this k2 (and the test's own domain module)."""
    package_root = Path(k2.__file__).parent.parent
    return {"PYTHONPATH": os.pathsep.join([str(package_root), str(HERE)])}


@pytest.mark.slow
def test_builtin_domain_served_over_mcp_and_wrapped_back() -> None:
    local = make_domain("bank")
    with McpDomain(sys.executable, ["-m", "k2", "env", "serve-mcp", "bank"], env=_env()) as remote:
        assert remote.name == "mcp:k2-bank" and remote.policy == local.policy
        assert remote.tool_specs() == local.tool_specs()
        args = {"from_account": "acc-1001", "to_account": "acc-2001", "amount_cents": 1000}
        assert remote.call("transfer", args).content == local.call("transfer", args).content
        got = remote.call("get_account", {"account_id": "acc-2001"})
        assert got.ok and json.loads(got.content)["balance_cents"] == 9000  # the server's state moved
        err = remote.call("transfer", dict(args, amount_cents=10**9))
        assert not err.ok and err.code == "insufficient_funds"
        bad = remote.call("transfer", dict(args, amount_cents="x"))
        assert bad.code == "invalid_arguments"  # validated client-side against the served schema
        # the wrapped server plays in an environment like any domain
        env = make_env(remote, None, user=_Quiet())
        env.reset()
        obs, _, _, _ = env.step(render_assistant("", [ToolCall("get_customer", {"customer_id": "c100"})]))
        assert json.loads(obs.messages[0]["content"])["name"] == "Mia Li"
        # k2 cannot see the server's state: DB is ungraded, never guessed
        task = example_tasks("bank")[0]
        graded = grade(task, remote, env.messages)
        assert graded.components["DB"].reward is None and graded.reward is None
    with pytest.raises(AgenticError, match="closed"):
        remote._invoke("get_customer", {"customer_id": "c100"})


@pytest.mark.slow
def test_a_users_own_domain_over_mcp() -> None:
    with McpDomain(sys.executable, ["-m", "k2", "env", "serve-mcp", "agentic_helpers:CounterDomain"], env=_env()) as remote:
        assert remote.tool_names() == ["add", "crash", "get"]
        assert remote.call("add", {"key": "a", "amount": 2}).content == "3"
        crash = remote.call("crash", {"why": "boom"})
        assert not crash.ok and crash.code == "internal_error" and "ZeroDivisionError" in crash.content


def test_a_server_that_does_not_start_is_a_clear_error() -> None:
    with pytest.raises(AgenticError, match="cannot start the MCP server"):
        McpDomain(sys.executable, ["-c", "import sys; sys.exit(3)"], timeout=20)


class _Quiet:
    def start(self) -> str:
        return "hello"

    def respond(self, agent_message: str) -> str:
        return "###STOP###"
