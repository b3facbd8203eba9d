"""The warm bank pool: Ray actors that live for a whole audit or sweep and train the packs of every bank
they are handed.

A worker keeps what costs time to rebuild (its imports, the loaded data set, each bank's context and
vectorisation choice, the CUDA context and compiled kernels) between packs, banks and sweep trials. Packs
are handed out one at a time to whichever worker is free, so a fast worker takes more; the concurrent
trials of a sweep share one pool (each trial keeps at most one pack in flight per worker). A worker that
dies (killed, or its node lost) is restarted by Ray and the pack it held goes back to the queue; a pack
already stored is never trained again, because every worker checks the store before training.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raymia import progress
from raymia.engine.bank_job import UNPREFIXED
from raymia.errors import Interrupted, RaymiaError, last_error_line
from raymia.spec import AuditSpec
from raymia.store import SignalStore

log = logging.getLogger("raymia")

MAX_RESTARTS = 3  # per worker: Ray restarts a lost worker this many times before the pool gives it up
RESTART_WAIT_S = 300  # how long packs wait for a lost worker's restart when no other worker is left
PING_S = 2.0  # a live worker answers `where` within this; one that does not yet is waited for as restarting
CONTEXTS_KEPT = 4  # bank contexts a worker keeps (one per defense setting it trained lately)


class BankWorker:
    """One warm worker (a Ray actor; `BankPool.start` makes the class remote with the bank's resources)."""

    def __init__(self, index: int, data: tuple[str, dict[str, Any]], device: str, threads: int, log_level: int):
        import torch

        import raymia.train.bank  # noqa: F401  (the imports a pack needs, paid once)
        from raymia.data.registry import load_dataset
        from raymia.engine.bank_job import worker_logging

        torch.set_num_threads(threads)
        worker_logging(log_level)
        self.index, self.device = index, torch.device(device)
        self._data = {_data_key(*data): load_dataset(*data)}  # the sweep's data set, loaded before any trial
        self._contexts: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._vectorize: dict[str, bool] = {}  # `choose_vectorize`'s answer per `_speed_key`
        torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # an optimizer's first build imports torch._dynamo
        if self.device.type == "cuda":
            torch.zeros(1, device=self.device)  # the CUDA context, created once

    def where(self) -> dict[str, Any]:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "ip": ray.util.get_node_ip_address()}

    def choose(self, spec: dict[str, Any], fingerprint: str, worker_models: int, log_level: int,
               prefix: str) -> tuple[bool, list[str]]:
        """The way the bank trains (`bank.vectorize: auto`: `choose_vectorize` times both here), decided once
        for all the run's packs: the two ways agree to float tolerance only. Returns it and the lines the
        driver says."""
        from raymia.engine.bank_job import worker_logging

        worker_logging(log_level, prefix)
        notes: list[str] = []
        return self._context(AuditSpec.model_validate(spec), fingerprint, worker_models, notes.append)[1], notes

    def train(self, spec: dict[str, Any], store_root: str, fingerprint: str, pack: int, worker_models: int,
              log_level: int, prefix: str) -> dict[str, Any] | None:
        """Train one pack and store it; None when the store already holds it (another worker or an earlier
        run stored it). Returns the pack's manifest extras (device, seconds, vectorised) and `notes`: the lines
        the driver says before the pack's (the bank's way of training, when this pack decided it)."""
        from raymia.engine.bank_job import worker_logging
        from raymia.train.bank import train_pack

        worker_logging(log_level, prefix)
        s = AuditSpec.model_validate(spec)
        store = SignalStore(store_root, fingerprint, s.bank.pack_size, s.plan.num_models, s.pack_fingerprints())
        if store.check_pack(pack) is None:
            return None
        notes: list[str] = []  # said by the driver, before the pack's line: a worker's own log arrives late
        ctx, vectorize = self._context(s, fingerprint, worker_models, notes.append)
        t0 = time.perf_counter()
        arrays, reports = train_pack(ctx, pack, self.device, vectorize=vectorize)
        meta = {"device": str(self.device), "seconds": time.perf_counter() - t0, "vectorized": vectorize,
                "worker": self.index, **self.where()}
        store.write_pack(pack, arrays, meta={**meta, "defense_reports": reports})
        return {**meta, "notes": notes}

    def _context(self, spec: AuditSpec, fingerprint: str, worker_models: int,
                 say: Callable[[str], None]) -> tuple[Any, bool]:
        from raymia.data.registry import load_dataset
        from raymia.train.bank import BankContext, choose_vectorize

        if fingerprint in self._contexts:
            self._contexts.move_to_end(fingerprint)
            ctx = self._contexts[fingerprint]
        else:
            key = _data_key(spec.data.name, spec.data.params)
            if key not in self._data:
                self._data = {key: load_dataset(spec.data.name, spec.data.params)}  # one data set kept
            ctx = BankContext.from_spec(spec, data=self._data[key], check_model=False)  # the audit checked it
            self._contexts[fingerprint] = ctx
            while len(self._contexts) > CONTEXTS_KEPT:
                self._contexts.popitem(last=False)
        # per setting of bank.vectorize: the driver passes the run's choice (`BankPool.run`) explicitly
        speed = _speed_key(spec)  # the sweep's trials differ in defense parameters, which do not change speed
        if speed not in self._vectorize:
            # the spec's setting, not the cached context's: a run's packs come with the choice `choose` made
            self._vectorize[speed] = choose_vectorize(ctx, ctx.pack_models(0), self.device, worker_models=worker_models,
                                                      say=say, choice=spec.bank.vectorize)
        return ctx, self._vectorize[speed]


def _speed_key(spec: AuditSpec) -> str:
    """What decides whether a pack trains faster vectorised: the model, data, recipe, pack size, precision
    and memory format, and which defense (its parameters change the numbers, not the kernels)."""
    import json

    d = spec.model_dump(mode="json")
    return json.dumps([d["model"], d["data"], d["train"], d["defense"]["name"], d["attacker"],
                       {k: d["bank"][k] for k in ("pack_size", "precision", "channels_last", "vectorize")}],
                      sort_keys=True, default=str)


def _data_key(name: str, params: dict[str, Any]) -> str:
    import json

    return json.dumps([name, params], sort_keys=True, default=str)


@dataclass
class BankPool:
    """Handles on the warm workers (picklable: a sweep hands the pool to every trial)."""

    workers: list[Any]  # Ray actor handles
    device: str
    places: list[dict[str, Any]] | None = None  # each worker's node, ip and pid, once `ready` has them
    _starting: list[Any] | None = None  # the workers' `where` calls, answered once they are warm
    _t0: float = 0.0
    _owner: int = 0  # pid of the process that started the pool (it alone reports the start)
    _closed: bool = False  # `shutdown` called: a run still in a thread (a stopped sweep's baseline) ends quietly

    @classmethod
    def start(cls, spec: AuditSpec, reserve_cpus: float = 0.0) -> BankPool:
        """Start `bank.num_workers` workers with the bank's resources, as many as the cluster's nodes can
        hold beside `reserve_cpus` (a sweep's trial drivers). A request no node can meet fails here, in one
        line, before any training. Returns at once: the workers warm up while the caller goes on, and
        `ready` waits for them."""
        import ray

        from raymia.engine.cluster import ensure_ray

        ensure_ray()
        b = spec.bank
        use_gpu = uses_gpu(b.device, ray.cluster_resources().get("GPU", 0))
        fit = capacity(b.cpus_per_worker, 1 if use_gpu else 0, reserve_cpus)
        n = min(b.num_workers, fit)
        if n < b.num_workers:
            log.info("bank pool: %d of the %d workers asked for (bank.num_workers) fit the cluster's nodes",
                     n, b.num_workers)
        device = "cuda" if use_gpu else "cpu"
        actor = ray.remote(concurrency_groups={"ping": 1})(BankWorker).options(  # ping: `where` answers mid-pack
            num_cpus=b.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=MAX_RESTARTS,
            max_task_retries=0,  # a lost pack is re-queued by the pool, which says so
            scheduling_strategy="SPREAD",  # across nodes: a lost node takes as few workers as it can
        )
        level = logging.getLogger("raymia").getEffectiveLevel()
        data = (spec.data.name, spec.data.model_dump(mode="json")["params"])
        t0 = time.perf_counter()
        workers = [actor.remote(i, data, device, max(1, int(b.cpus_per_worker)), level) for i in range(n)]
        log.info("bank pool: starting %d worker(s) of %g CPU%s", n, b.cpus_per_worker, " + 1 GPU" if use_gpu else "")
        return cls(workers, device, _starting=[_ping(w) for w in workers], _t0=t0, _owner=os.getpid())

    def ready(self) -> BankPool:
        """Wait until every worker is warm (its imports done, the data loaded) and note where each runs."""
        import ray

        if self.places is None:
            try:
                self.places = ray.get(self._starting)
            except ray.exceptions.RayActorError as e:
                raise RaymiaError(f"bank workers failed to start: {_cause(e)}") from None
            self._starting = None
            nodes = len({p["node"] for p in self.places})
            if os.getpid() == self._owner:
                log.info("bank pool: %d warm worker(s) on %d node(s) (%s), ready in %.1fs", len(self.workers),
                         nodes, self.device, time.perf_counter() - self._t0, extra={UNPREFIXED: True})
        return self

    def run(self, spec: AuditSpec, store: SignalStore, packs: list[int], prefix: str = "") -> None:
        """Train `packs` of the bank `store` holds. Each free worker takes the next pack. A worker lost
        mid-pack is one log line; its pack goes back to the queue for the next free worker, and the worker
        takes packs again once Ray has restarted it."""
        import ray

        self.ready()
        raw = spec.model_copy(update={"bank": spec.bank.model_copy(update={"device": self.device})}
                              ).model_dump(mode="json")
        root = store.root
        level = logging.getLogger("raymia").getEffectiveLevel()
        queue = collections.deque(packs)
        free, restarting = self._alive()  # restarting: a worker's `where` call, answered once it is back
        losses = [0] * len(self.workers)
        inflight: dict[Any, tuple[int, int]] = {}  # a pack's call -> (worker, pack)
        alive = max(1, len(free) + len(restarting))
        share = max(1, len(packs) * store.pack_size // alive)
        log.info("training %d pack(s) on %d warm worker(s)%s", len(packs), alive,
                 " (GPU)" if self.device == "cuda" else "")
        if raw["bank"]["vectorize"] == "auto" and free:  # one way for every pack, decided by one worker
            try:
                vectorize, notes = ray.get(self.workers[free[0]].choose.remote(raw, store.fingerprint, share, level,
                                                                               prefix))
            except ray.exceptions.RayActorError:  # lost while it timed: the hand-out below says so
                pass
            else:
                for note in notes:
                    log.info("%s", note)
                raw["bank"]["vectorize"] = vectorize
        done_count, start = 0, time.perf_counter()
        with progress.bar(f"{prefix}bank packs", len(packs)) as shown:
            while queue or inflight:
                while queue and free:
                    w, p = free.popleft(), queue.popleft()
                    inflight[self.workers[w].train.remote(raw, root, store.fingerprint, p, share, level, prefix)] = (w, p)
                if not inflight and not restarting:
                    if self.closed():
                        raise Interrupted("the bank pool was shut down")
                    raise RaymiaError(f"every bank worker was lost; packs {sorted(queue)} of signals {store.fingerprint} "
                                      "are not trained (a re-run trains only those)")
                ready, _ = ray.wait([*inflight, *restarting], num_returns=1,
                                    timeout=None if inflight else RESTART_WAIT_S)
                if not ready:
                    raise RaymiaError(f"no bank worker came back within {RESTART_WAIT_S}s of being lost (the cluster "
                                      f"cannot place its request); packs {sorted(queue)} of signals {store.fingerprint} "
                                      "are not trained (a re-run trains only those)")
                ref = ready[0]
                if ref in restarting:
                    w = restarting.pop(ref)
                    try:
                        self.places[w] = ray.get(ref)
                        free.append(w)
                    except ray.exceptions.ActorUnavailableError:  # still restarting: ask again shortly
                        time.sleep(0.2)
                        restarting[_ping(self.workers[w])] = w
                    except ray.exceptions.RayActorError as e:
                        self._lost(w, e, None, losses, restarting)
                    continue
                w, p = inflight.pop(ref)
                try:
                    meta = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    queue.appendleft(p)
                    self._lost(w, e, p, losses, restarting)
                    continue
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, RaymiaError):
                        raise cause from None
                    raise
                free.append(w)
                done_count += 1
                left = (time.perf_counter() - start) / done_count * (len(packs) - done_count)
                if meta is None:
                    log.info("pack %d was already stored (%d/%d)", p, done_count, len(packs))
                else:
                    for note in meta.get("notes", ()):
                        log.info("%s", note)
                    log.info("worker %d: pack %d done (%d/%d, %.1fs%s)", w, p, done_count, len(packs), meta["seconds"],
                             f", about {_duration(left)} left" if done_count < len(packs) else "")
                shown.advance()

    def _lost(self, w: int, error: BaseException, pack: int | None, losses: list[int],
              restarting: dict[Any, int]) -> None:
        """Say in one line that worker w was lost (and which pack goes back to the queue); wait for Ray's
        restart of it unless it was lost too often."""
        if self.closed():  # killed by `shutdown`: no loss to report, nothing to wait for
            raise Interrupted("the bank pool was shut down")
        losses[w] += 1
        gone = losses[w] > MAX_RESTARTS
        place = self.places[w]
        back = f"; pack {pack} goes back to the queue" if pack is not None else ""
        # one process of the worker's (a restart keeps the actor, not the pid; a pid alone may come again)
        if _first_to_say(f"raymia-lost/{self.workers[w]._actor_id.hex()}/{place['pid']}"):
            log.warning("bank worker %d (node %s, pid %s) lost: %s%s%s", w, place["ip"], place["pid"], _cause(error),
                        back, f"; worker given up after {losses[w]} losses" if gone else "")
        elif back:  # another of the sweep's trials, sharing the pool, said the loss already
            log.info("bank worker %d lost (said above)%s", w, back)
        if not gone:
            restarting[_ping(self.workers[w])] = w

    def _alive(self) -> tuple[collections.deque[int], dict[Any, int]]:
        """The workers to hand packs to now, and those (restarting, or waiting for a node) to wait for. A
        worker found dead is left out without a word: the run that lost it said so (the concurrent trials
        of a sweep share the pool, not their runs' bookkeeping)."""
        import ray

        pings = {_ping(w): i for i, w in enumerate(self.workers)}
        answered, _ = ray.wait(list(pings), num_returns=len(pings), timeout=PING_S)
        free: collections.deque[int] = collections.deque()
        restarting: dict[Any, int] = {}
        for ref, i in pings.items():
            if ref not in answered:
                restarting[ref] = i
                continue
            try:
                self.places[i] = ray.get(ref)
                free.append(i)
            except ray.exceptions.ActorUnavailableError:
                restarting[_ping(self.workers[i])] = i
            except ray.exceptions.RayActorError:
                log.debug("bank worker %d is gone", i)
        return free, restarting

    def closed(self) -> bool:
        """Whether `shutdown` was called, in this process or in another that holds the pool: a sweep's trial
        processes hold copies of it, whose `_closed` the driver's shutdown does not reach, so it also says so
        in Ray's key-value store."""
        return self._closed or (bool(self.workers) and _said(self._closed_key()))

    def _closed_key(self) -> str:
        return f"raymia-pool-closed/{self.workers[0]._actor_id.hex()}"

    def shutdown(self) -> None:
        import ray

        from raymia.engine.cluster import going_down

        self._closed = True
        if going_down():  # the workers end with the local Ray; its GCS, hanging, would hold each call below
            return
        if self.workers:
            _first_to_say(self._closed_key())
        for w in self.workers:
            ray.kill(w, no_restart=True)


def _ping(worker) -> Any:
    """A worker's `where` call in its own concurrency group: answered at once, even mid-pack."""
    return worker.where.options(concurrency_group="ping").remote()


def _duration(s: float) -> str:
    from raymia.report.text import duration

    return duration(s)


def _first_to_say(key: str) -> bool:
    """Whether this process is the first of the cluster to claim `key` (Ray's key-value store, shared by the
    processes of a sweep's concurrent trials); True where the store cannot be reached."""
    try:
        from ray.experimental.internal_kv import _internal_kv_put

        return not _internal_kv_put(key, b"1", overwrite=False, namespace="raymia")
    except Exception:  # noqa: BLE001  # saying a loss twice beats not saying it
        return True


def _said(key: str) -> bool:
    """Whether a process of the cluster has claimed `key` (`_first_to_say`); False where the store cannot be
    reached."""
    try:
        from ray.experimental.internal_kv import _internal_kv_exists

        return bool(_internal_kv_exists(key, namespace="raymia"))
    except Exception:  # noqa: BLE001  # then the loss is said and waited for, as for any lost worker
        return False


def _cause(e: BaseException) -> str:
    """One line of why Ray lost an actor (an exception in the worker, its node gone, a kill)."""
    return last_error_line(str(getattr(e, "error_msg", "") or e)) if str(e).strip() else type(e).__name__


def live_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the Ray cluster this process is connected to."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def uses_gpu(device: str, gpus: float) -> bool:
    """Whether the pool's workers each hold a GPU: `bank.device` cuda, or auto where the cluster has one."""
    return device == "cuda" or (device == "auto" and gpus >= 1)


def local_node() -> dict[str, float]:
    """The most the local Ray instance that a run starts without RAY_ADDRESS can have: this machine's CPUs
    (Ray counts a container's CPU quota, which may be fewer: the run checks again once Ray starts) and the
    GPUs torch sees. For `raymia check`, which starts no Ray and imports none."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


# What `raymia check` measures against without RAY_ADDRESS, in its one-line errors: the run would start its
# own Ray there, and a cluster's nodes are known only once a run connects.
THIS_MACHINE = "this machine (where a run without RAY_ADDRESS starts its own Ray)"


def _largest_node(on: str | None) -> str:
    return "the largest node of the Ray cluster" if on is None else on


def check_trial_cpu(trial_cpu: float, nodes: list[dict[str, float]] | None = None, on: str | None = None) -> None:
    """A sweep's trial driver holds `sweep.trial_cpu` CPUs of one node: more than the largest node has left
    every trial pending and Tune waiting for ever, while the undefended baseline trained beside it. `nodes`:
    each node's resources (default: the live nodes of the connected cluster); `on`: what the nodes are, for
    the error (default: the connected cluster)."""
    nodes = live_nodes() if nodes is None else nodes
    most = max((r.get("CPU", 0) for r in nodes), default=0)
    if trial_cpu > most:
        raise RaymiaError(f"{trial_cpu:g} CPUs per trial driver, but {_largest_node(on)} has "
                          f"{most:g}; accepted: at most {most:g} (a trial's bank workers ask for their own)",
                          where="sweep.trial_cpu")


def capacity(cpus: float, gpus: int, reserve_cpus: float = 0.0, nodes: list[dict[str, float]] | None = None,
             on: str | None = None) -> int:
    """How many workers of `cpus` CPUs (and `gpus` GPUs) the nodes hold beside `reserve_cpus` CPUs (a
    sweep's trial drivers: on 2 CPUs, 1 worker of 1 CPU); a RaymiaError of one line, naming the field, when
    not even one fits. `nodes`: each node's resources (default: the live nodes of the connected cluster);
    `on`: what the nodes are, for the error (default: the connected cluster)."""
    nodes = live_nodes() if nodes is None else nodes
    if gpus and not any(r.get("GPU", 0) >= gpus for r in nodes):
        have = sum(r.get("GPU", 0) for r in nodes)
        raise RaymiaError(f"bank.device: cuda asks for {gpus} GPU per worker, but " + (
            f"the Ray cluster has {have:g} GPUs on {len(nodes)} node(s); use bank.device: auto or cpu, or add "
            "GPU nodes" if on is None else
            f"{on} has {have:g}; use bank.device: auto or cpu, or set RAY_ADDRESS to a cluster with GPUs"))
    fits = [r for r in nodes if r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus]
    if not fits:
        most = max((r.get("CPU", 0) for r in nodes), default=0)
        raise RaymiaError(f"bank.cpus_per_worker: {cpus:g} CPUs per worker, but {_largest_node(on)} has "
                          f"{most:g}; accepted: at most {most:g}")
    per_node = [int(r.get("CPU", 0) // cpus) if not gpus else min(int(r.get("CPU", 0) // cpus),
                                                                   int(r.get("GPU", 0) // gpus)) for r in nodes]
    n, free = sum(per_node), sum(r.get("CPU", 0) for r in nodes) - reserve_cpus
    while n > 0 and n * cpus > free + 1e-9:  # the reserve comes out of the workers' share
        n -= 1
    if n == 0:
        raise RaymiaError(f"bank.cpus_per_worker: {cpus:g} CPUs per worker leave no room for the {reserve_cpus:g} "
                          "CPUs of the sweep's trial drivers (sweep.trial_cpu x sweep.max_concurrent) on "
                          + (f"a {free + reserve_cpus:g}-CPU cluster" if on is None else
                             f"{on}, {free + reserve_cpus:g} CPUs") + "; lower one of them")
    return n
