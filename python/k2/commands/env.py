"""``k2 env``: list, show and play agentic domains, or serve one over MCP (docs/agentic.md)."""

from __future__ import annotations

import argparse
import json
import sys

PLAY_HELP = """\
You are the agent. Type a reply to the user, or:
  /call TOOL {"arg": value}   call a tool (JSON arguments; several /call lines joined by ' ;; '
                              run as one turn)
  /tools                      list the tools
  /quit                       end the episode now
"""


def _domain(spec: str):
    from k2.agentic import make_domain

    return make_domain(spec)


def _tasks(args: argparse.Namespace, domain_name: str):
    from k2.agentic.tasks import example_tasks, load_tasks

    return load_tasks(args.tasks) if getattr(args, "tasks", None) else example_tasks(domain_name)


def list_domains(args: argparse.Namespace) -> int:
    from k2.agentic import domains, make_domain
    from k2.agentic.tasks import example_tasks

    for name in domains():
        d = make_domain(name)
        kinds = [d.tool_kind(t) for t in d.tool_names()]
        print(
            f"{name:<10} {len(kinds):2d} tools ({kinds.count('read')} read, {kinds.count('write')} write)"
            f"  {len(example_tasks(name))} example tasks"
        )
    return 0


def show(args: argparse.Namespace) -> int:
    d = _domain(args.domain)
    print(f"domain {d.name}\n\npolicy:\n  {d.policy}\n\ntools:")
    for spec in d.tool_specs():
        fn = spec["function"]
        params = ", ".join(
            f"{k}{'' if k in fn['parameters'].get('required', []) else '?'}"
            for k in fn["parameters"].get("properties", {})
        )
        kind = d.tool_kind(fn["name"])
        print(f"  {fn['name']}({params})  [{kind}]  {fn['description'].splitlines()[0]}")
    if args.json:
        print(json.dumps(d.tool_specs(), indent=2))
    tasks = _tasks(args, d.name)
    if tasks:
        print(f"\ntasks: {', '.join(t.id for t in tasks)}\n\nexample task:")
        print(json.dumps(tasks[0].to_json(), indent=2, ensure_ascii=False))
    return 0


def _turn_from_input(line: str) -> str:
    from k2.agentic.calls import ToolCall, render_assistant
    from k2.errors import AgenticError

    line = line.strip()
    if not line.startswith("/call"):
        return line
    calls = []
    for part in line.split(" ;; "):
        body = part.strip().removeprefix("/call").strip()
        name, _, raw = body.partition(" ")
        if not name:
            raise AgenticError("usage: /call TOOL {json arguments}")
        calls.append(ToolCall(name, None, "", raw.strip() or "{}"))
    return render_assistant("", calls)


def play(args: argparse.Namespace) -> int:
    from k2.agentic.calls import parse_assistant
    from k2.agentic.env import make_env
    from k2.agentic.tasks import find_task
    from k2.errors import AgenticError

    d = _domain(args.domain)
    task = find_task(_tasks(args, d.name), args.task)
    env = make_env(args.domain, task, seed=args.seed, stochastic=args.stochastic, max_turns=args.max_turns)
    obs = env.reset()
    print(f"domain {d.name}, task {task.id}\npolicy: {d.policy}\n")
    print(PLAY_HELP)
    for m in obs.messages:
        if m["role"] == "user":
            print(f"user> {m['content']}")
    done, info = False, {}  # type: tuple[bool, dict]
    counter = 0
    while not done:
        try:
            line = input("agent> ")
        except EOFError:
            line = "/quit"
        if line.strip() == "/tools":
            print(", ".join(d.tool_names()))
            continue
        if line.strip() == "/quit":
            line = "###STOP###"
        try:
            text = _turn_from_input(line)
        except AgenticError as err:
            print(f"  ({err})")
            continue
        turn = parse_assistant(text)
        if turn.calls:  # number the calls the way K2 does, over the whole dialog
            from k2.agentic.calls import render_assistant

            for c in turn.calls:
                c.id = f"functions.{c.name}:{counter}"
                counter += 1
            text = render_assistant(turn.content, turn.calls)
        obs, reward, done, info = env.step(text)
        for m in obs.messages:
            if m["role"] == "tool":
                print(f"tool {m['tool_call_id']}> {m['content']}")
            else:
                print(f"user> {m['content']}")
    grade = info.get("grade")
    print(f"\nepisode over ({info.get('termination')})")
    if grade is not None:
        print(json.dumps(grade.to_json(), indent=2))
        print(f"reward: {grade.reward if grade.graded else 'ungraded'}")
    sys.stdout.flush()
    return 0


def serve_mcp(args: argparse.Namespace) -> int:
    from k2.agentic import make_domain
    from k2.agentic.mcp_bridge import serve_domain

    serve_domain(make_domain(args.domain, stochastic=args.stochastic, seed=args.seed))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "env",
        help="agentic domains: list, show, play one by hand, serve one over MCP",
        description="Tool-use environments (k2.agentic). DOMAIN is a built-in name (k2 env list) "
        "or module:Class naming your own Domain subclass.",
    )
    commands = parser.add_subparsers(dest="env_command", metavar="ACTION", required=True)

    p = commands.add_parser("list", help="the domains, their tool counts and example tasks")
    p.set_defaults(handler=list_domains)

    p = commands.add_parser("show", help="a domain's policy, tools and an example task")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--json", action="store_true", help="also print the tool specs as JSON")
    p.add_argument("--tasks", metavar="FILE", help="a tau2-format task file (default: the shipped examples)")
    p.set_defaults(handler=show)

    p = commands.add_parser(
        "play",
        help="play the agent of a task in the terminal and see the grade",
        description="You play the agent: type replies to the simulated user or /call tool calls; "
        "the episode ends when the user is satisfied (or /quit), then the grade is printed.",
    )
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--task", required=True, metavar="ID")
    p.add_argument("--tasks", metavar="FILE", help="a tau2-format task file (default: the shipped examples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stochastic", action="store_true", help="simulate transient tool failures")
    p.add_argument("--max-turns", type=int, default=20)
    p.set_defaults(handler=play)

    p = commands.add_parser(
        "serve-mcp",
        help="serve a domain's tools as an MCP server over stdio",
        description="Run an MCP server on stdin/stdout whose tools are the domain's, acting on "
        "one in-memory copy of its state for the life of the connection.",
    )
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stochastic", action="store_true", help="simulate transient tool failures")
    p.set_defaults(handler=serve_mcp)
