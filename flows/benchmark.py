"""Prefect flow: the benchmark (`dvc repro`) with independent stages running in parallel.

    python flows/benchmark.py          from the repository root: run it in-process (Prefect's
                                       ephemeral mode, no server)
    python flows/benchmark.py deploy   a deployment on the work pool `ops.work_pool` of the
                                       server at PREFECT_API_URL (run it with `prefect deployment run`)

Each task runs one DVC stage, `dvc repro --single-item <stage>` (e.g. `unlearn@digits-random-2-finetune`),
so dvc.yaml stays the single source of truth for commands, dependencies and caching; the flow
takes the order from DVC's stage graph and adds the parallelism (per data set split ->
train_target; per setting prepare -> retrain, and inputs after the target; per setting and method
unlearn; then the report). Stages that are up to date are skipped by DVC itself. As under
`unlearnops repro`, the stages spool their MLflow runs and the flow logs them at the end.

GPUs (params.yaml `ops.benchmark.gpus`): every task holds one GPU while it runs, given to its
`dvc` process through CUDA_VISIBLE_DEVICES, so a host with k GPUs runs k stages at once.
Without GPUs, `ops.benchmark.max_parallel` stages run at once. Work pools, GPU hosts and a
Prefect server: flows/README.md.
"""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect import runtime as prefect_runtime
from prefect.cache_policies import NO_CACHE

from unlearnops import tracking
from unlearnops.ops.orchestration import deploy
from unlearnops.config import ConfigError, load_params


class StageError(RuntimeError):
    """A DVC stage that exited with an error."""


def gpu_ids(cfg: str | list) -> list[str]:
    """GPU ids from `ops.benchmark.gpus`: auto = those visible to this process."""
    if cfg != "auto":
        if not isinstance(cfg, list):
            raise ConfigError(f"ops.benchmark.gpus must be 'auto' or a list of GPU ids, got {cfg!r}")
        return [str(g) for g in cfg]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class Slots:
    """Devices shared by concurrent tasks: `hold()` waits for a free one and gives it back after."""

    def __init__(self, devices: list[str | None]):
        self.size = len(devices)
        self._free: queue.Queue = queue.Queue()
        for device in devices:
            self._free.put(device)

    @contextmanager
    def hold(self):
        device = self._free.get()
        try:
            yield device
        finally:
            self._free.put(device)


def devices(params: dict) -> list[str | None]:
    """One entry per stage that may run at once: a GPU id, or None for a CPU slot."""
    cfg = params["ops"]["benchmark"]
    return gpu_ids(cfg["gpus"]) or [None] * max(1, int(cfg["max_parallel"]))


_SLOTS: dict[str, Slots] = {}  # one pool per flow run; tasks get plain inputs, never this object
_SLOTS_LOCK = threading.Lock()


def slots(params: dict) -> Slots:
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(str(prefect_runtime.flow_run.id), Slots(devices(params)))


@task(cache_policy=NO_CACHE)
def run_stage(stage: str, parent_run_id: str | None, spool_dir: str | None = None) -> dict:
    """`dvc repro --single-item <stage>`, holding one device slot; its MLflow runs go to `spool_dir`
    (tracking.replay) if given."""
    logger = get_run_logger()
    with slots(load_params()).hold() as gpu:
        env = {**os.environ, **({tracking.PARENT_ENV: parent_run_id} if parent_run_id else {})}
        if spool_dir:
            env[tracking.SPOOL_ENV] = spool_dir
        # dvc.yaml's commands call `python`: the interpreter running this flow.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        logger.info(f"{stage}: starting" + (f" on GPU {gpu}" if gpu is not None else ""))
        start = time.perf_counter()
        # --wait-for-lock: DVC holds its repository lock while it checks and records a stage
        # (not while the command runs); parallel stages queue for it instead of failing.
        done = subprocess.run([sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage],
                              env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise StageError(f"stage {stage} failed (dvc exit code {done.returncode}):\n{tail}")
    logger.info(f"{stage}: done in {seconds:.1f} s")
    return {"stage": stage, "seconds": seconds, "gpu": gpu}


def stage_graph() -> dict[str, list[str]]:
    """dvc.yaml's stages in dependency order, each with the stages it waits for: DVC's own
    graph of the working directory, so the flow follows dvc.yaml as it changes."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(".") as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        order = reversed(list(nx.topological_sort(graph)))
        return {stage.addressing: sorted(dep.addressing for dep in graph.successors(stage)) for stage in order}


@flow(name="benchmark")
def benchmark() -> list[dict]:
    """The benchmark of the repository in the working directory, under one MLflow parent run
    (like `unlearnops repro`)."""
    params = load_params()
    mlflow = tracking.configure(params)
    with mlflow.start_run(run_name="pipeline", tags={"unlearnops.stage": "pipeline", "orchestrator": "prefect"}) as run, \
            tempfile.TemporaryDirectory(prefix="unlearnops-spool-") as spool:
        futures = {}
        for stage, after in stage_graph().items():  # in dependency order
            futures[stage] = run_stage.submit(stage, run.info.run_id, spool, wait_for=[futures[a] for a in after])
        try:
            return [futures[stage].result() for stage in futures]
        finally:
            wait(list(futures.values()))  # every stage has finished or failed before its runs are logged
            tracking.replay(params, spool, run.info.run_id)
            _SLOTS.pop(str(prefect_runtime.flow_run.id), None)


def deploy_to_pool() -> str:
    pool = load_params()["ops"]["work_pool"]
    return deploy(benchmark, "flows/benchmark.py:benchmark", "benchmark", pool)


if __name__ == "__main__":
    if sys.argv[1:] == ["deploy"]:
        print(f"deployment {deploy_to_pool()}")
        sys.exit(0)
    for row in benchmark():
        print(f"{row['stage']:<24} {row['seconds']:8.1f} s" + (f"  GPU {row['gpu']}" if row["gpu"] is not None else ""))
