"""tau2-format task files: load, save, malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2.agentic import example_tasks, load_tasks, make_env, save_tasks
from k2.errors import K2IOError, TaskError

MINIMAL = {
    "id": "t1",
    "user_scenario": {"persona": None, "instructions": {"domain": "bank", "reason_for_call": "Hi", "known_info": None,
                                                        "unknown_info": None, "task_instructions": "x"}},
    "evaluation_criteria": {"actions": [{"action_id": "a", "name": "get_account", "arguments": {"account_id": "acc-1001"}}]},
}


def test_round_trip_keeps_unknown_fields(tmp_path: Path) -> None:
    task = dict(MINIMAL, my_field={"keep": [1, 2]}, ticket="T-9")
    task["evaluation_criteria"] = dict(task["evaluation_criteria"], future_thing=True)
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([task]))
    loaded = load_tasks(path)
    assert loaded[0].id == "t1" and loaded[0].reward_basis == ["DB", "COMMUNICATE"]
    out = tmp_path / "out.json"
    save_tasks(loaded, out)
    assert json.loads(out.read_text()) == [task]


def test_every_shipped_task_file_loads() -> None:
    from k2.agentic import domains

    for name in domains():
        tasks = example_tasks(name)
        assert len(tasks) >= 2, name
        assert all(t.domain_name == name for t in tasks)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: t.pop("id"), "no usable 'id'"),
        (lambda t: t.update(user_scenario=[]), r"task 't1': field user_scenario: must be dict"),
        (lambda t: t["evaluation_criteria"].update(actions={}), r"task 't1': field evaluation_criteria.actions"),
        (lambda t: t["evaluation_criteria"]["actions"][0].pop("name"), r"evaluation_criteria.actions\[0\].name"),
        (lambda t: t["evaluation_criteria"]["actions"][0].update(arguments="x"), r"actions\[0\].arguments"),
        (lambda t: t["evaluation_criteria"].update(reward_basis=["DB", "VIBES"]), r"reward_basis\[1\]"),
        (lambda t: t["evaluation_criteria"].update(communicate_info=[3]), r"communicate_info\[0\]"),
        (lambda t: t["evaluation_criteria"].update(env_assertions=[{"env_type": "user", "func_name": "f", "arguments": {}}]),
         r"task 't1': field evaluation_criteria.env_assertions\[0\].env_type: 'user'"),
        (lambda t: t["evaluation_criteria"]["actions"][0].update(requestor="user"), r"task 't1'.*requestor: 'user'"),
        (lambda t: t.update(initial_state={"initialization_actions": [{"env_type": "user", "func_name": "x", "arguments": {}}]}),
         r"task 't1'.*initialization_actions\[0\].env_type"),
        (lambda t: t.update(initial_state={"initialization_data": {"user_data": {"x": 1}}}), r"task 't1'.*user_data"),
        (lambda t: t["user_scenario"].update(instructions=5), r"user_scenario.instructions"),
    ],
)
def test_malformed_tasks_name_the_task_and_field(tmp_path: Path, mutate, match) -> None:
    task = json.loads(json.dumps(MINIMAL))
    mutate(task)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([task]))
    with pytest.raises(TaskError, match=match):
        load_tasks(path)


def test_unreadable_and_non_json_files(tmp_path: Path) -> None:
    with pytest.raises(K2IOError):
        load_tasks(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(TaskError, match="not JSON"):
        load_tasks(bad)
    bad.write_text("3")
    with pytest.raises(TaskError, match="list of tasks"):
        load_tasks(bad)
    bad.write_text(json.dumps([MINIMAL, MINIMAL]))
    with pytest.raises(TaskError, match="appears twice"):
        load_tasks(bad)


def test_plain_string_instructions_play(tmp_path: Path) -> None:
    task = dict(MINIMAL, user_scenario={"instructions": "I want to know my balance of acc-1001."})
    path = tmp_path / "t.json"
    path.write_text(json.dumps([task]))
    (loaded,) = load_tasks(path)
    assert loaded.domain_name is None
    env = make_env("bank", loaded)
    obs = env.reset()
    assert obs.messages[-1] == {"role": "user", "content": "I want to know my balance of acc-1001."}
    _, reward, done, info = env.step("Your balance is 2540.00.<|im_end|>")
    assert done and info["termination"] == "user_stop" and reward == 1.0
