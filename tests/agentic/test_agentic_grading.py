"""Grading with tau2's semantics, on the shipped tasks and hand-made variations."""

from __future__ import annotations

import json

import pytest

from k2.agentic import ToolCall, domains, example_tasks, find_task, grade, make_env, render_assistant
from k2.agentic.grading import ProgrammaticJudge
from k2.agentic.scripted import GoldAgent
from k2.agentic.tasks import Task


def play(domain, task, agent_turns) -> tuple[float | None, dict]:
    env = make_env(domain, task)
    env.reset()
    done, info, reward = False, {}, None
    for text in agent_turns:
        _, reward, done, info = env.step(text)
        if done:
            break
    return reward, info


def gold_turns(task: Task, parallel: bool = False) -> list[str]:
    agent = GoldAgent(task, parallel)
    return [agent.act() for _ in range(len(agent.script))]


@pytest.mark.parametrize("domain", ["bank", "calendar", "contacts", "device", "notes", "shop"])
def test_replaying_gold_actions_scores_one(domain) -> None:
    assert domain in domains()
    for task in example_tasks(domain):
        for parallel in (False, True):
            reward, info = play(domain, task, gold_turns(task, parallel))
            assert reward == 1.0, (task.id, info["grade"].to_json())
            assert info["termination"] == "user_stop"
            # grading from the domain name replays the trajectory's calls: same verdict
            assert grade(task, domain, info["messages"]).reward == 1.0


def _task(domain: str, task_id: str, **criteria) -> Task:
    raw = find_task(example_tasks(domain), task_id).to_json()
    raw["evaluation_criteria"].update(criteria)
    return Task(raw)


def test_one_wrong_argument_scores_zero_under_db() -> None:
    task = find_task(example_tasks("bank"), "bank-move-savings")
    wrong = render_assistant("", [ToolCall("transfer", {"from_account": "acc-1002", "to_account": "acc-1001", "amount_cents": 150001})])
    reward, info = play("bank", task, [wrong + "<|im_end|>", "Done. 10500.00"])
    assert reward == 0.0 and info["grade"].components["DB"].reward == 0.0
    assert info["grade"].components["COMMUNICATE"].reward == 1.0


def test_missing_write_scores_zero() -> None:
    task = find_task(example_tasks("shop"), "shop-cancel-headphones")
    reward, info = play("shop", task, ["Refund would be 199.00. Bye."])
    assert reward == 0.0 and info["grade"].components["DB"].reward == 0.0


def test_extra_write_scores_zero() -> None:
    task = find_task(example_tasks("notes"), "notes-add-todo")
    turns = gold_turns(task)
    extra = render_assistant("", [ToolCall("tag_file", {"path": "/notes/todo.txt", "tag": "urgent"})]) + "<|im_end|>"
    reward, info = play("notes", task, [turns[0], turns[1], extra, turns[-1]])
    assert reward == 0.0 and info["grade"].components["DB"].reward == 0.0
    # an extra *read* and a failed write do not count against the agent
    reads = render_assistant("", [ToolCall("read_file", {"path": "/notes/todo.txt"}),
                                  ToolCall("delete_file", {"path": "/nope.txt"})]) + "<|im_end|>"
    reward, info = play("notes", task, [turns[0], reads, turns[1], turns[-1]])
    assert reward == 1.0


def test_communicate_is_a_case_insensitive_substring_ignoring_commas() -> None:
    task = find_task(example_tasks("bank"), "bank-move-savings")
    turns = gold_turns(task)
    reward, _ = play("bank", task, turns[:-1] + ["Your savings now hold $10,500.00."])
    assert reward == 1.0
    reward, info = play("bank", task, turns[:-1] + ["All done."])
    assert reward == 0.0 and info["grade"].components["COMMUNICATE"].details == ["never said '10500.00'"]


def test_action_component_honours_compare_args() -> None:
    task = _task("bank", "bank-move-savings", reward_basis=["ACTION"])
    task.raw["evaluation_criteria"]["actions"][0]["compare_args"] = ["from_account", "to_account"]
    task = Task(task.raw)
    call = ToolCall("transfer", {"from_account": "acc-1002", "to_account": "acc-1001", "amount_cents": 1, "memo": "m"})
    reward, _ = play("bank", task, [render_assistant("", [call]), "ok"])
    assert reward == 1.0
    call = ToolCall("transfer", {"from_account": "acc-1001", "to_account": "acc-1002", "amount_cents": 150000})
    reward, _ = play("bank", task, [render_assistant("", [call]), "ok"])
    assert reward == 0.0


def test_env_assertions() -> None:
    task = find_task(example_tasks("notes"), "notes-add-todo")
    task = _task("notes", "notes-add-todo", reward_basis=["ENV_ASSERTION"])
    turns = gold_turns(task)
    assert play("notes", task, turns)[0] == 1.0
    assert play("notes", task, [turns[0], turns[-1]])[0] == 0.0


def test_nl_assertions_programmatic_or_ungraded() -> None:
    task = find_task(example_tasks("bank"), "bank-insufficient-funds")
    ok, _ = play("bank", task, gold_turns(task))
    assert ok == 1.0
    bad, info = play("bank", task, ["Payment complete, and it was insufficient."])
    assert bad == 0.0 and info["grade"].components["NL_ASSERTION"].reward == 0.0
    vague = _task("bank", "bank-insufficient-funds", nl_assertions=["The agent is empathetic."])
    reward, info = play("bank", vague, gold_turns(vague))
    assert reward is None and info["grade"].components["NL_ASSERTION"].reward is None
    assert not info["grade"].graded


def test_programmatic_judge_forms() -> None:
    traj = [{"role": "assistant", "content": "I froze account acc-2001.",
             "tool_calls": [{"id": "1", "function": {"name": "freeze_account", "arguments": "{}"}}]}]
    j = ProgrammaticJudge()
    assert j.judge('The agent mentions "acc-2001"', traj) is True
    assert j.judge('The agent does not say "acc-2001"', traj) is False
    assert j.judge("The agent calls freeze_account", traj) is True
    assert j.judge("The agent never calls transfer", traj) is True
    assert j.judge("The agent is polite", traj) is None


def test_bad_episode_endings_score_zero() -> None:
    task = find_task(example_tasks("bank"), "bank-insufficient-funds")
    env = make_env("bank", task, max_turns=1)
    env.reset()
    _, reward, done, info = env.step("Could you tell me your account?")
    assert done and info["termination"] == "max_turns" and reward == 0.0


def test_openai_endpoint_judge_and_user_through_the_real_client(openai_server) -> None:
    from k2.agentic import OpenAIJudge, OpenAIUser

    url, requests = openai_server
    judge = OpenAIJudge("judge-model", base_url=url, api_key="k")
    task = _task("bank", "bank-insufficient-funds", nl_assertions=["The agent is empathetic."])
    reward, info = play_with(task, judge)
    assert reward == 1.0 and info["grade"].components["NL_ASSERTION"].reward == 1.0
    assert requests[-1]["model"] == "judge-model" and "empathetic" in requests[-1]["messages"][-1]["content"]
    user = OpenAIUser(task, "user-model", base_url=url, api_key="k", seed=7)
    assert user.start() == "I need help ###STOP###"
    assert requests[-1]["seed"] == 7 and requests[-1]["messages"][0]["role"] == "system"
    assert "City Water" in requests[-1]["messages"][0]["content"]


def play_with(task, judge):
    env = make_env("bank", task, judge=judge)
    env.reset()
    done = False
    turns = gold_turns(task)
    while not done:
        _, reward, done, info = env.step(turns.pop(0))
    return reward, info


@pytest.fixture
def openai_server():
    """A local HTTP server speaking the chat-completions protocol, for the real openai client."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            text = '{"met": true}' if body["model"] == "judge-model" else "I need help ###STOP###"
            reply = {
                "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1", requests
    server.shutdown()
