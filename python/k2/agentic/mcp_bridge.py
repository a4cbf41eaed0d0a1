"""MCP in both directions, with the ``mcp`` SDK (docs/agentic.md).

- :func:`serve_domain` serves a domain's tools as an MCP server over stdio (``k2 env serve-mcp
  DOMAIN``): ``tools/list`` gives each tool's name, description and JSON Schema; ``tools/call``
  runs it against the domain's state, a tool error coming back as a result with ``isError``.
- :class:`McpDomain` wraps any MCP server's tools (listed and called through the SDK's client
  over stdio) as a stateless :class:`~k2.agentic.Domain`, so environments, the parser and
  grading work with them unchanged. The client session lives on a background event loop;
  the Domain API stays synchronous.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from k2.agentic.domain import Domain
from k2.agentic.tools import ToolError
from k2.errors import AgenticError
from k2.optional import require


def _leaf(err: BaseException) -> BaseException:
    """The first innermost exception of (nested) exception groups."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return err


def _mcp(purpose: str) -> Any:
    return require("mcp", extra="agentic", purpose=purpose)


async def _serve(domain: Domain) -> None:
    mcp = _mcp("k2 env serve-mcp")
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server

    types = mcp.types

    async def list_tools(ctx: Any, params: Any) -> Any:
        tools = [
            types.Tool(
                name=spec["function"]["name"],
                description=spec["function"].get("description"),
                input_schema=spec["function"]["parameters"],
            )
            for spec in domain.tool_specs()
        ]
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: Any) -> Any:
        result = domain.call(params.name, params.arguments or {})
        return types.CallToolResult(content=[types.TextContent(text=result.content)], is_error=not result.ok)

    server = Server(
        f"k2-{domain.name}", instructions=domain.policy or None, on_list_tools=list_tools, on_call_tool=call_tool
    )
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def serve_domain(domain: Domain) -> None:
    """Serve ``domain`` over stdio until the client closes the connection."""
    asyncio.run(_serve(domain))


class McpDomain(Domain):
    """The tools of an MCP server started as a subprocess, as a stateless domain.

    Args:
        command: the server's executable; ``args`` its arguments; ``env`` extra environment.
        policy: the agent's policy text (default: the server's instructions).
        timeout: seconds to wait for the server to start and for each call.

    Use it as a context manager, or call :meth:`close`, to stop the server. k2 cannot see the
    server's state, so grading's DB component is "ungraded" for it.
    """

    stateful = False

    def __init__(
        self,
        command: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        policy: str | None = None,
        timeout: float = 30.0,
        stochastic: bool = False,
        failure_rate: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__({}, stochastic=stochastic, failure_rate=failure_rate, seed=seed)
        self.command, self.args, self.env, self.timeout = command, list(args), dict(env or {}), timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="k2-mcp-client", daemon=True)
        self._thread.start()
        self._stop: asyncio.Event | None = None
        self._ready: asyncio.Future | None = None
        self._session: Any = None
        self._runner = asyncio.run_coroutine_threadsafe(self._main(), self._loop)
        try:
            init, tools = asyncio.run_coroutine_threadsafe(self._wait_ready(), self._loop).result(timeout)
        except Exception as err:
            self.close()
            raise AgenticError(
                f"cannot start the MCP server {command} {' '.join(self.args)}: {_leaf(err)} "
                "(its stderr, above, may say why)"
            ) from err
        self.server_name = getattr(getattr(init, "server_info", None), "name", None) or command
        self.name = f"mcp:{self.server_name}"  # type: ignore[misc]  # per instance for MCP
        self.policy = policy if policy is not None else (getattr(init, "instructions", None) or "")  # type: ignore[misc]
        self._specs: dict[str, dict[str, Any]] = {
            t.name: {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description or t.name,
                    "parameters": dict(t.input_schema or {"type": "object"}),
                },
            }
            for t in tools
        }

    async def _main(self) -> None:
        mcp = _mcp("k2.agentic.McpDomain")
        self._stop = asyncio.Event()
        self._ready = self._loop.create_future()
        try:
            params = mcp.StdioServerParameters(command=self.command, args=self.args, env=self.env or None)
            async with mcp.stdio_client(params) as (read, write):
                async with mcp.ClientSession(read, write) as session:
                    init = await session.initialize()
                    listing = await session.list_tools()
                    self._session = session
                    self._ready.set_result((init, listing.tools))
                    await self._stop.wait()
        except BaseException as err:  # noqa: BLE001 - reported to the waiting constructor
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(err if isinstance(err, Exception) else RuntimeError(str(err)))
            if not isinstance(err, Exception):
                raise

    async def _wait_ready(self) -> Any:
        while self._ready is None:
            await asyncio.sleep(0.001)
        return await self._ready

    # ---- Domain overrides ----------------------------------------------------------------------
    def tool_specs(self) -> list[dict[str, Any]]:
        return [self._specs[name] for name in sorted(self._specs)]

    def _schema(self, name: str) -> dict[str, Any] | None:
        spec = self._specs.get(name)
        return spec["function"]["parameters"] if spec else None

    def tool_kind(self, name: str) -> str:
        return "generic"

    def _invoke(self, name: str, arguments: dict[str, Any]) -> Any:
        if self._session is None:
            raise AgenticError(f"the MCP server of {self.name} is closed")
        future = asyncio.run_coroutine_threadsafe(self._session.call_tool(name, arguments), self._loop)
        try:
            result = future.result(self.timeout)
        except TimeoutError:
            future.cancel()
            raise ToolError(f"{name} timed out after {self.timeout} s", "timeout", retryable=True) from None
        text = "\n".join(getattr(block, "text", "") for block in result.content if getattr(block, "type", "") == "text")
        if getattr(result, "is_error", False):
            try:
                import json

                error = json.loads(text).get("error")
                if isinstance(error, dict):
                    raise ToolError(error.get("message", text), error.get("code", "mcp_error"), bool(error.get("retryable")))
            except (ValueError, AttributeError):
                pass
            raise ToolError(text or f"{name} failed", "mcp_error")
        return text

    def default_state(self) -> dict[str, Any]:
        return {}

    def fresh(self, state: Mapping[str, Any] | None = None, **options: Any) -> Domain:
        """The same connection: an MCP domain has no state of k2's to reset."""
        return self

    def close(self) -> None:
        """Stop the server and the client's event loop."""
        if self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
            try:
                self._runner.result(self.timeout)
            except Exception:  # noqa: BLE001 - closing regardless
                pass
        self._session = None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout)
            self._loop.close()

    def __enter__(self) -> McpDomain:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
