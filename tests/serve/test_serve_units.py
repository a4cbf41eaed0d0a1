"""Parts of k2 serve below the HTTP layer: the engine's on_token hook, the scheduler's bounded
queue, and choices built from untrusted model text."""

from __future__ import annotations

import json

import pytest

from k2.agentic.calls import ARG_BEGIN, CALL_BEGIN, CALL_END, IM_END, SECTION_BEGIN, SECTION_END
from k2.errors import ServeError
from k2.rl.rollout import Request, RolloutEngine
from k2.serve.scheduler import Job, QueueFull, Scheduler
from k2.serve.schemas import choice_of, parse_chat_request


def test_on_token_sees_every_token_and_can_end_a_request(tiny):
    model, _ = tiny
    engine = RolloutEngine(model, max_batch=2)
    requests = [Request([5, 6, 7], 9, seed=s) for s in range(3)]
    plain = engine.generate(requests)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def on_token(index: int, token: int) -> bool:
        seen[index].append(token)
        return index == 1 and len(seen[1]) == 4  # end request 1 after its 4th token

    hooked = engine.generate(requests, on_token=on_token)
    assert [seen[i] for i in range(3)] == [c.token_ids for c in hooked]
    assert hooked[0].token_ids == plain[0].token_ids and hooked[2].token_ids == plain[2].token_ids
    assert hooked[1].token_ids == plain[1].token_ids[:4] and hooked[1].finish_reason == "stop"
    assert plain[1].finish_reason == "length" and len(plain[1].token_ids) == 9


def test_full_queue_raises_and_a_started_scheduler_drains_it(tiny):
    model, _ = tiny
    scheduler = Scheduler(RolloutEngine(model, max_batch=2), max_queue=2)
    jobs = [Job([Request([3, 4], 3, seed=i)]) for i in range(3)]
    scheduler.submit(jobs[0])
    scheduler.submit(jobs[1])
    with pytest.raises(QueueFull):
        scheduler.submit(jobs[2])
    scheduler.start()
    try:
        results = [job.future.result(timeout=60) for job in jobs[:2]]
    finally:
        scheduler.stop()
    assert [len(r[0].token_ids) for r in results] == [3, 3]


def test_unparsable_tool_sections_never_raise():
    good = f'{CALL_BEGIN}functions.add:0{ARG_BEGIN}{{"a": 1, "b": true}}{CALL_END}'
    texts = [
        f"hi{SECTION_BEGIN}{CALL_BEGIN}functions.add:0{ARG_BEGIN}{{not json{CALL_END}{SECTION_END}{IM_END}",
        f"{SECTION_BEGIN}{CALL_BEGIN}{ARG_BEGIN}[1]{CALL_END}",
        f"x{CALL_END}{SECTION_END}{ARG_BEGIN}",
        f"{SECTION_BEGIN}{good}{CALL_BEGIN}functions.add:1{ARG_BEGIN}{{\"a\"",
    ]
    for text in texts:
        choice = choice_of(0, text, "length", [], True)
        json.dumps(choice)
        calls = choice["message"].get("tool_calls") or []
        for call in calls:
            assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": True}
    # a broken call is left out, and with none left the raw text is the content
    broken = choice_of(0, texts[0], "stop", [], True)
    assert "tool_calls" not in broken["message"] and "not json" in broken["message"]["content"]
    # a section cut off by the budget keeps its complete call but reports "length"
    cut = choice_of(0, texts[3], "length", [], True)
    assert len(cut["message"]["tool_calls"]) == 1 and cut["finish_reason"] == "length"
    whole = choice_of(0, f"{SECTION_BEGIN}{good}{SECTION_END}{IM_END}", "stop", [], True)
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None


def test_request_validation_names_fields():
    ok = parse_chat_request({"model": "m", "messages": [{"role": "developer", "content": "be brief"}],
                             "stop": "x", "max_completion_tokens": 5}, "m")
    assert ok.messages[0]["role"] == "system" and ok.stop == ["x"] and ok.max_tokens == 5
    cases = [
        ({"messages": [{"role": "user", "content": "a"}]}, "model"),
        ({"model": "m", "messages": [{"role": "tool", "content": "a"}]}, "messages[0].tool_call_id"),
        ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": "a"}], "stop": [""]}, "stop"),
        ({"model": "m", "messages": [{"role": "user", "content": "a"}], "seed": 1.5}, "seed"),
        ({"model": "m", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
         "tools[0].function.name"),
        ({"model": "m", "messages": [{"role": "user", "content": "a"}], "logprobs": True}, "logprobs"),
    ]
    for body, field in cases:
        with pytest.raises(ServeError) as info:
            parse_chat_request(body, "m")
        assert info.value.field == field and info.value.status == 400
    with pytest.raises(ServeError) as info:
        parse_chat_request({"model": "x", "messages": [{"role": "user", "content": "a"}]}, "m")
    assert info.value.status == 404


def test_between_steps_runs_before_every_forward_and_can_change_the_version(tiny):
    model, _ = tiny
    engine = RolloutEngine(model, max_batch=2)
    calls = []

    def between() -> None:
        calls.append(len(calls))
        engine.weight_version = 1 if len(calls) > 3 else 0

    out = engine.generate([Request([5, 6], 6, seed=s) for s in range(3)], between_steps=between)
    stats = engine.last_stats
    assert len(calls) == stats.prefills + stats.decode_steps
    versions = [v for c in out for v in c.versions]
    assert set(versions) == {0, 1}  # tokens sampled after the switch carry the new version
    assert all(c.versions == sorted(c.versions) for c in out)



def test_admit_joins_late_requests_to_the_running_batch(tiny):
    """Requests handed over by ``admit`` mid-call join free rows (the batch grows up to
    max_batch) and sample exactly what they sample alone; each finished request reaches
    ``on_finish`` once, and the call ends when nothing runs or waits."""
    from collections import deque

    model, _ = tiny
    engine = RolloutEngine(model, max_batch=3)
    first = Request([5, 6, 7], 12, seed=1)  # no stop ids: exactly 12 tokens
    late = [Request([4, 9, 2, 7][: 2 + s % 3], 5 + s, seed=10 + s) for s in range(4)]
    alone = {r.seed: engine.generate([r])[0].token_ids for r in [first, *late]}
    arrivals, rooms, finished = deque(late), [], {}

    def admit(room: int) -> list[Request]:
        rooms.append(room)
        if len(rooms) == 1:
            return [first]
        if len(rooms) < 4:  # three steps into the first request, the others arrive
            return []
        return [arrivals.popleft() for _ in range(min(room, len(arrivals)))]

    def on_finish(completion):
        assert completion.index not in finished
        finished[completion.index] = completion

    assert engine.generate([], admit=admit, on_finish=on_finish) == []  # only through on_finish
    assert rooms[:4] == [3, 2, 2, 2]  # the first request holds one row of three
    assert sorted(finished) == [0, 1, 2, 3, 4] and engine.last_stats.requests == 5
    for completion in finished.values():
        assert completion.token_ids == alone[completion.seed]
    stats = engine.last_stats
    assert stats.tokens == 12 + sum(5 + s for s in range(4))
    assert stats.row_steps > stats.decode_steps  # rows decoded together
    order = list(finished)  # insertion order: the order they finished in
    assert order.index(1) < order.index(0)  # a late, short request did not wait for the first
    with pytest.raises(Exception, match="max_steps"):
        engine.generate([], admit=admit, max_steps=3)
