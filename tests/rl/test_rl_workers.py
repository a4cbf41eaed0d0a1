"""Rollout workers (``k2 rl --rollout-workers N``): with two workers fed by the weight broadcast
(shared memory, or gloo ranks with ``--weight-transport dist``) the samples are the colocated
engine's under the same seeds, tagged with the trainer's step; paused samples resume on the
workers; a killed worker is named and its prompts finished by the other (docs/rl.md, "Rollout
workers")."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_policy

from k2.rl import Request, RolloutEngine
from k2.rl.workers import RolloutWorkers


def requests(n: int, budget: int = 6) -> list[Request]:
    g = torch.Generator().manual_seed(0)
    return [Request(torch.randint(5, 200, (3 + i % 4,), generator=g).tolist(), budget,
                    temperature=0.9, stop_ids=[7]) for i in range(n)]


def same(a, b) -> None:  # noqa: ANN001
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


@pytest.mark.slow  # spawns two worker processes (each imports torch and builds a model)
@pytest.mark.parametrize("transport", ["shm", "dist"])
def test_two_workers_sample_what_the_colocated_engine_samples_and_survive_a_death(transport: str) -> None:
    model = tiny_policy(3)
    lines: list[str] = []
    workers = RolloutWorkers(model, model.config.to_hf_dict(), 2, max_batch=4, log=lines.append,
                             transport=transport)
    try:
        local = RolloutEngine(model, max_batch=8)
        batch = requests(10)
        assert workers.sync(5) > 0
        got = workers.generate(batch, seed=11)
        same(got, local.generate(batch, seed=11))
        assert all(c.versions == [5] * len(c.token_ids) for c in got)
        assert [c.index for c in got] == list(range(10))

        # Partial rollouts: paused after 2 decode steps on the workers, resumed on them with
        # the same weights, the samples are the uninterrupted ones.
        paused = workers.generate(batch, seed=11, max_steps=2)
        assert any(c.finish_reason is None for c in paused)
        todo = [i for i, c in enumerate(paused) if c.finish_reason is None]
        more = workers.generate([dataclasses.replace(batch[i], prefix=paused[i]) for i in todo], seed=99)
        whole = list(paused)
        for i, c in zip(todo, more):
            whole[i] = c
        same(whole, got)

        # New weights: the workers sample with them, tagged with the new step.
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        workers.sync(6)
        got = workers.generate(batch, seed=12)
        same(got, local.generate(batch, seed=12))
        assert all(set(c.versions) == {6} for c in got)

        workers.processes["rollout-1"].kill()
        workers.processes["rollout-1"].join(timeout=10)
        got = workers.generate(batch, seed=13)
        same(got, local.generate(batch, seed=13))
        assert workers.dead == ["rollout-1"]
        assert any("rollout worker rollout-1 died" in line for line in lines)
        workers.sync(7)  # training goes on: the survivor still gets new weights
        if transport == "dist":  # the gloo group was rebuilt without the dead rank
            assert workers.transport.generation == 1 and workers.transport.members == ["rollout-0"]
        got = workers.generate(batch, seed=14)
        same(got, local.generate(batch, seed=14))
        assert all(set(c.versions) == {7} for c in got)

        workers.processes["rollout-0"].kill()  # none left: the trainer's process samples
        workers.processes["rollout-0"].join(timeout=10)
        workers.sync(8)
        got = workers.generate(batch, seed=15)
        same(got, local.generate(batch, seed=15))
        assert sorted(workers.dead) == ["rollout-0", "rollout-1"] and workers.alive == []
        assert all(set(c.versions) == {8} for c in got)
    finally:
        workers.close()


@pytest.mark.slow  # spawns two worker processes
def test_a_worker_from_elsewhere_joins_by_address_and_a_silent_one_is_given_up(monkeypatch) -> None:
    import os
    import signal
    import socket

    import k2.rl.dist_workers as dist_workers

    monkeypatch.setattr(dist_workers, "HEARTBEAT_DEAD_S", 6.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A worker started on its own, knowing only the store's address (as on another host).
    remote = torch.multiprocessing.get_context("spawn").Process(
        target=dist_workers.dist_worker_main, args=(None, "127.0.0.1", port), daemon=True)
    remote.start()
    model = tiny_policy(3)
    lines: list[str] = []
    workers = None
    try:
        workers = RolloutWorkers(model, model.config.to_hf_dict(), 1, max_batch=4, log=lines.append,
                                 transport="dist", remote=1, address=f"127.0.0.1:{port}")
        assert workers.alive == ["rollout-0", "remote-0"]
        assert any(f"python -m k2.rl.dist_workers 127.0.0.1:{port}" in line for line in lines)
        local = RolloutEngine(model, max_batch=8)
        batch = requests(10)
        workers.sync(1)
        got = workers.generate(batch, seed=21)
        same(got, local.generate(batch, seed=21))
        assert all(set(c.versions) == {1} for c in got)

        os.kill(remote.pid, signal.SIGSTOP)  # alive, but silent: only its heartbeat can tell
        got = workers.generate(batch, seed=22)
        same(got, local.generate(batch, seed=22))
        assert workers.dead == ["remote-0"]
        assert any("rollout worker remote-0 died (no heartbeat for" in line for line in lines)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        workers.sync(2)
        assert workers.transport.members == ["rollout-0"]
        got = workers.generate(batch, seed=23)
        same(got, local.generate(batch, seed=23))
        assert all(set(c.versions) == {2} for c in got)
    finally:
        if workers is not None:
            workers.close()
        remote.kill()
        remote.join(timeout=10)
