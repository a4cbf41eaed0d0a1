"""Rollout workers as ``torch.distributed`` ranks (``k2 rl --rollout-workers N --weight-transport
dist``; docs/rl.md, "Rollout workers across hosts").

The trainer is rank 0 of a gloo group whose other ranks are the workers; the weights travel with
:class:`k2.broadcast.DistributedWeightPublisher` / :class:`~k2.broadcast.DistributedWeightSubscriber`
on that group. Nothing else needs shared memory or a shared file system: a ``torch.distributed``
TCP store hosted by the trainer carries the rest —

* ``config``: what a worker needs to build its replica (model configuration, engine rows,
  padding id, threads), so a worker needs only the store's address and its name
  (:func:`dist_worker_main`);
* ``generation/G``: the members of group generation ``G`` (worker names, rank ``i + 1`` for the
  ``i``-th); every generation's gloo group rendezvouses under its own prefix;
* ``announce/G/V``: the trainer step whose weights are version ``V`` of generation ``G``, set
  just before they are broadcast (a worker enters the collective only once announced), and
  ``applied/G/V``: a counter each worker bumps once it has applied them — ``publish`` returns
  when every member has, as on the shared-memory path;
* ``in/NAME/I`` and ``out/NAME/J``: the requests for, and completions from, worker NAME, in
  order (pickled), the messages :class:`k2.rl.workers.RolloutWorkers` deals;
* ``heartbeat/NAME``: a counter each worker bumps every half second.

The trainer's process never initializes ``torch.distributed``'s default group (its optimizer and
harness would then reduce over the workers too): the group is a ``ProcessGroupGloo`` built
directly, which the broadcast classes accept.

A dead worker (its process exited, or no heartbeat for ``HEARTBEAT_DEAD_S``) is reported by
:meth:`DistTransport.exited`; :class:`~k2.rl.workers.RolloutWorkers` names it and deals its
requests to the others (the same logic as on the shared-memory path). A gloo group with a dead
member cannot broadcast, so the next :meth:`DistTransport.publish` first builds generation
``G + 1`` with the survivors (each survivor sees the new ``generation`` key, leaves the old group
and joins the new one); a member that dies during a broadcast makes it fail after the group's
timeout, and the publish is repeated on a new generation without it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pickle
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from k2.errors import BroadcastError, RLError

if TYPE_CHECKING:
    from k2.model.model import K2ForCausalLM

STORE_TIMEOUT_S = 300.0
"""Longest wait on the store (a worker starting: importing torch and building its replica)."""
GROUP_TIMEOUT_S = 30.0
"""Gloo's timeout for one collective: how long a broadcast waits for a member that died."""
HEARTBEAT_S = 0.5
HEARTBEAT_DEAD_S = 20.0
"""A worker whose heartbeat did not move for this long counts as dead."""
POLL_S = 0.01


def _gloo_group(store: dist.Store, host: str, generation: int, rank: int, size: int) -> dist.ProcessGroupGloo:
    """Generation ``generation``'s gloo group, rendezvousing under its own prefix of ``store``.

    The network interface is ``GLOO_SOCKET_IFNAME`` when set; with a store on a loopback address
    (every member on this host) the loopback; else the one the host name resolves to."""
    options = dist.ProcessGroupGloo._Options()
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    if interface:
        device = dist.ProcessGroupGloo.create_device(interface=interface)
    elif _loopback(host):
        device = dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
    else:
        device = dist.ProcessGroupGloo.create_default_device()
    options._devices = [device]
    options._timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    return dist.ProcessGroupGloo(dist.PrefixStore(f"group/{generation}/", store), rank, size, options)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _has(store: dist.Store, key: str) -> bool:
    return store.check([key])


def _wait(store: dist.Store, key: str, seconds: float) -> bool:
    """Whether ``key`` appears within ``seconds`` (polled: the store's own timed wait logs a
    warning every time it times out)."""
    deadline = time.monotonic() + seconds
    while not store.check([key]):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def dist_worker_main(name: str | None, host: str, port: int) -> None:
    """A rollout worker: join the trainer's store at ``host:port`` as ``name`` (None: as the next
    ``remote-I`` the trainer expects, for a worker started on another host), build the replica
    the store's ``config`` describes, keep its weights current through the gloo groups of every
    generation that includes it, and answer the requests sent to it until told to stop (None)."""
    import signal

    from k2.broadcast import DistributedWeightSubscriber
    from k2.model import K2Config, K2ForCausalLM
    from k2.rl.rollout import RolloutEngine
    from k2.rl.workers import answer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's
    store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))
    if name is None:
        name = f"remote-{store.add('remote/joined', 1) - 1}"
    config = pickle.loads(store.get("config"))
    torch.set_num_threads(config["threads"])
    model = K2ForCausalLM(K2Config.from_hf_dict(config["hf_config"])).eval()
    engine = RolloutEngine(model, max_batch=config["max_batch"], pad_token_id=config["pad_token_id"])
    lock = threading.RLock()  # held while weights land and while a batch decodes
    applied = threading.Condition()
    held = [-1]  # the trainer step whose weights the replica holds
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            store.add(f"heartbeat/{name}", 1)
            time.sleep(HEARTBEAT_S)

    def weights() -> None:
        generation = 0
        while not stop.is_set():
            if not _wait(store, f"generation/{generation}", 1.0):
                continue
            members = pickle.loads(store.get(f"generation/{generation}"))
            if name not in members:  # given up on by the trainer: leave
                stop.set()
                return
            version, broken = 1, False
            try:
                group = _gloo_group(store, host, generation, members.index(name) + 1, len(members) + 1)
                subscriber = DistributedWeightSubscriber(model, src=0, worker=name, group=group)
            except (RuntimeError, dist.DistError, BroadcastError):
                broken = True  # another member never joined: wait for the next generation
            while not stop.is_set():
                if _has(store, f"generation/{generation + 1}"):
                    break  # the trainer regrouped: join the next generation
                announced = f"announce/{generation}/{version}"
                if broken or not _has(store, announced):
                    time.sleep(POLL_S)
                    continue
                step = int(store.get(announced))
                try:
                    with lock:
                        subscriber.update()
                except BroadcastError:
                    broken = True  # a member died mid-broadcast: wait for the next generation
                    continue
                with applied:
                    held[0] = step
                    applied.notify_all()
                store.add(f"applied/{generation}/{version}", 1)
                version += 1
            generation += 1

    store.set(f"ready/{name}", "1")
    threads = [threading.Thread(target=heartbeat, name=f"{name}-heartbeat", daemon=True),
               threading.Thread(target=weights, name=f"{name}-weights", daemon=True)]
    for thread in threads:
        thread.start()
    received = sent = 0
    try:
        while not stop.is_set():
            key = f"in/{name}/{received}"
            if not _wait(store, key, 1.0):
                continue
            message = pickle.loads(store.get(key))
            store.delete_key(key)
            received += 1
            if message is None:
                break
            completions = answer(name, engine, lock, lambda: held[0], applied, message)
            store.set(f"out/{name}/{sent}", pickle.dumps((message[0], name, completions)))
            sent += 1
    finally:
        stop.set()
    # Told to stop: leave without running the destructors of the gloo groups, whose threads
    # abort the process at interpreter exit ("terminate called without an active exception").
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); raises :class:`RLError` naming the address otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RLError(f"rollout store address {address!r} is not HOST:PORT")
    return host, int(port)


class DistTransport:
    """The trainer's side of rollout workers over ``torch.distributed`` (the module docs): spawns
    ``count`` workers on this host (``rollout-0`` ..), expects ``remote`` more started elsewhere
    (``remote-0`` ..: ``python -m k2.rl.dist_workers HOST:PORT``), hosts the store at
    ``address`` (``HOST:PORT``; default a free port on 127.0.0.1), and offers
    :class:`k2.rl.workers.RolloutWorkers` the same methods as the shared-memory transport."""

    kind = "dist"

    def __init__(self, model: K2ForCausalLM, hf_config: dict[str, Any], count: int, *, max_batch: int,
                 pad_token_id: int, threads: int, remote: int = 0, address: str = "",
                 log: Any = print) -> None:
        self.model = model
        if address:
            self.host, self.port = parse_address(address)
        else:
            self.host, self.port = "127.0.0.1", _free_port("127.0.0.1")
        host = self.host
        self.store = dist.TCPStore(host, self.port, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))
        self.store.set("config", pickle.dumps({"hf_config": hf_config, "max_batch": max_batch,
                                               "pad_token_id": pad_token_id, "threads": threads}))
        context = torch.multiprocessing.get_context("spawn")
        self.processes: dict[str, Any] = {}
        for i in range(count):
            name = f"rollout-{i}"
            process = context.Process(target=dist_worker_main, name=name, daemon=True,
                                      args=(name, host, self.port))
            process.start()
            self.processes[name] = process
        self.names = [*self.processes, *(f"remote-{i}" for i in range(remote))]
        if remote:
            log(f"rollout workers: waiting for {remote} remote worker(s); start each with "
                f"`python -m k2.rl.dist_workers {self.host}:{self.port}`")
        self.sent = {name: 0 for name in self.names}
        self.received = {name: 0 for name in self.names}
        self.beats: dict[str, tuple[int, float]] = {}
        self.generation = -1
        self.members: list[str] = []
        self.publisher = None
        try:
            self.start()
        except BaseException:
            self.close([])
            raise

    def describe(self) -> str:
        return f"torch.distributed gloo group, store {self.host}:{self.port}, generation {self.generation}"

    def start(self) -> None:
        """Form generation 0 with every worker (blocks until all have built their replicas and
        joined; a worker that dies on the way is an error naming it)."""
        deadline = time.monotonic() + STORE_TIMEOUT_S
        for name in self.names:
            process = self.processes.get(name)
            while not _has(self.store, f"ready/{name}"):
                if process is not None and not process.is_alive():
                    raise RLError(f"rollout worker {name} exited (code {process.exitcode}) while starting")
                if time.monotonic() > deadline:
                    raise RLError(f"rollout worker {name} did not start within {STORE_TIMEOUT_S:.0f} s")
                time.sleep(0.05)
        self._regroup(list(self.names))

    def _regroup(self, members: list[str]) -> None:
        from k2.broadcast import DistributedWeightPublisher

        self.generation += 1
        self.members = list(members)
        self.store.set(f"generation/{self.generation}", pickle.dumps(self.members))
        now = time.monotonic()
        self.beats = {name: (-1, now) for name in self.members}
        self.publisher = None
        if self.members:
            group = _gloo_group(self.store, self.host, self.generation, 0, len(self.members) + 1)
            self.publisher = DistributedWeightPublisher(self.model, group=group)

    def exited(self, name: str) -> str | None:
        process = self.processes.get(name)
        if process is not None and not process.is_alive():
            return f"exit code {process.exitcode}"
        count = self.store.add(f"heartbeat/{name}", 0)
        last, since = self.beats.get(name, (-1, time.monotonic()))
        now = time.monotonic()
        if count != last:
            self.beats[name] = (count, now)
            return None
        if now - since > HEARTBEAT_DEAD_S:
            return f"no heartbeat for {now - since:.0f} s"
        return None

    def publish(self, step: int, alive: list[str]) -> tuple[int, dict[str, str]]:
        """Broadcast the trainer's weights as those of ``step`` to ``alive`` (regrouping first if
        the group has other members); returns ``step`` (the version workers wait for) and the
        workers that failed meanwhile, with why."""
        failures: dict[str, str] = {}
        alive = [n for n in alive if n in self.names]
        while True:
            if alive != self.members:
                try:
                    self._regroup(alive)
                except (RuntimeError, dist.DistError):  # a member died before joining the group
                    dead = self._dead_within(HEARTBEAT_DEAD_S + 1)
                    if not dead:
                        raise
                    failures.update(dead)
                    alive = [n for n in alive if n not in dead]
                    continue
            if self.publisher is None:
                return step, failures
            version = self.publisher.version + 1
            generation = self.generation
            self.store.set(f"announce/{generation}/{version}", str(step))
            try:
                self.publisher.publish()
            except BroadcastError as err:
                dead = self._dead_within(HEARTBEAT_DEAD_S + 1)
                if not dead:
                    raise
                failures.update(dead)
                alive = [n for n in alive if n not in dead]
                continue
            dead = self._await_applied(generation, version)
            if not dead:
                return step, failures
            failures.update(dead)
            alive = [n for n in alive if n not in dead]

    def _dead_within(self, seconds: float) -> dict[str, str]:
        deadline = time.monotonic() + seconds
        while True:
            dead = {n: why for n in self.members if (why := self.exited(n)) is not None}
            if dead or time.monotonic() > deadline:
                return dead
            time.sleep(0.1)

    def _await_applied(self, generation: int, version: int) -> dict[str, str]:
        """Wait until every member applied ``version``; the members that died meanwhile."""
        key = f"applied/{generation}/{version}"
        while self.store.add(key, 0) < len(self.members):
            dead = {n: why for n in self.members if (why := self.exited(n)) is not None}
            if dead:
                return dead
            time.sleep(POLL_S)
        return {}

    def send(self, name: str, message: tuple | None) -> None:
        self.store.set(f"in/{name}/{self.sent[name]}", pickle.dumps(message))
        self.sent[name] += 1

    def receive(self, timeout: float) -> tuple | None:
        deadline = time.monotonic() + timeout
        while True:
            for name in self.names:
                key = f"out/{name}/{self.received[name]}"
                if _has(self.store, key):
                    reply = pickle.loads(self.store.get(key))
                    self.store.delete_key(key)
                    self.received[name] += 1
                    return reply
            if time.monotonic() > deadline:
                return None
            time.sleep(POLL_S)

    def close(self, alive: list[str]) -> None:
        for name in alive:
            try:
                self.send(name, None)
            except (RuntimeError, dist.DistError):
                pass
        from k2.rl.workers import stop_processes

        stop_processes(self.processes.values())
        self.publisher = None



if __name__ == "__main__":  # a worker on another host: python -m k2.rl.dist_workers HOST:PORT
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m k2.rl.dist_workers HOST:PORT (the trainer's rollout store)")
    dist_worker_main(None, *parse_address(sys.argv[1]))
