"""Prefect flow: the benchmark (`dvc repro`) on a Dask cluster, each stage's N models in seed chunks.

    python flows/benchmark.py          from the repository root: run it on this machine (no server
                                       to start by hand: a private Prefect server and a local Dask
                                       cluster live as long as the run)
    python flows/benchmark.py deploy   a deployment on the work pool `ops.work_pool` of the
                                       server at PREFECT_API_URL (run it with `prefect deployment run`)

Each stage task runs one DVC stage, `dvc repro --single-item <stage>` (e.g.
`unlearn@digits-random-2-finetune`), so dvc.yaml stays the single source of truth for commands,
dependencies and caching; the order is DVC's own stage graph and up-to-date stages are skipped by
DVC itself. With a chunk store (params.yaml `runtime.store`), the retrain and unlearning stages fan
out: the setting's inputs are published to the store once their stages ran
(`chunks.publish_inputs`), every chunk of `runtime.chunk_models` seeds (`chunks.plan`) is a task
that any worker runs in its own working copy (`chunks.run_chunk`: fetch the inputs, compute, put
the chunk under its content key), and the stage itself then runs here, merging the chunks from the
store (recomputing none it holds) and evaluating. Without a store, each stage computes its N
models itself, as `dvc repro` does.

Scheduling is Dask's (prefect-dask's DaskTaskRunner), not this file's: every task that computes
holds the worker resource `GPU` (one per worker: one GPU, or one CPU slot), and the stage tasks
also hold this working copy's resource (`WORKSPACE_PREFIX` + a run id), which only workers started
in this checkout offer. With `ops.benchmark.cluster` unset the task runner starts a local cluster:
one worker per GPU of `ops.benchmark.gpus` (CUDA_VISIBLE_DEVICES set per worker) or
`ops.benchmark.max_parallel` CPU workers, all in this checkout. With `ops.benchmark.cluster` (a
scheduler address, tcp://host:8786) the chunks run on that cluster's workers and the flow adds one
worker of its own in this checkout for the stages. A worker that dies mid-chunk: Dask runs the
chunk again on another worker; its key is the same, so the store holds it once and the stage
merges it once. Cluster commands and why Dask: flows/README.md. As under `unlearnops repro`, the
stages spool their MLflow runs and the flow logs them at the end.

Sources followed: prefect-dask's DaskTaskRunner and its `dask.annotate(resources=...)` example
(docs.prefect.io/integrations/prefect-dask); Dask's worker resources and SpecCluster
(distributed.dask.org: "Worker Resources", "SpecCluster").
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import dask
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from unlearnops import chunks, tracking
from unlearnops.config import ConfigError, load_params
from unlearnops.ops.orchestration import _die_with_parent, deploy, prefect_api, stop_process

GPU = "GPU"  # the worker resource a computing task holds: one per worker (a GPU, or a CPU slot)
WORKSPACE_PREFIX = "workspace-"  # + a run id: the resource of the workers in the flow's own checkout


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


def local_workers(params: dict, workspace: str) -> dict[str, dict]:
    """The local cluster's workers (distributed.SpecCluster's spec): one per GPU, each seeing only
    its GPU, else `max_parallel` CPU workers; one thread each, holding one `GPU` slot and the workspace."""
    from distributed import Nanny

    cfg = params["ops"]["benchmark"]
    gpus = gpu_ids(cfg["gpus"])
    names = [f"gpu-{g}" for g in gpus] or [f"cpu-{i}" for i in range(int(cfg["max_parallel"]))]
    envs = [{"CUDA_VISIBLE_DEVICES": g} for g in gpus] or [{} for _ in names]
    # memory_limit 0: a chunk's memory is set by its size, not Dask's (which would restart a worker
    # at 95% of its share of the host's memory, 1/16 of it on a 16-core host)
    return {name: {"cls": Nanny, "options": {"nthreads": 1, "resources": {GPU: 1, workspace: 1}, "env": env, "name": name,
                                               "dashboard": False, "memory_limit": 0}}
            for name, env in zip(names, envs)}


def task_runner(params: dict, workspace: str):
    """DaskTaskRunner on `ops.benchmark.cluster`, or on a local cluster of `local_workers`."""
    from distributed import Scheduler, SpecCluster
    from prefect_dask import DaskTaskRunner

    address = params["ops"]["benchmark"].get("cluster")
    if address:
        return DaskTaskRunner(address=address)
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return DaskTaskRunner(cluster_class=SpecCluster, cluster_kwargs={"workers": local_workers(params, workspace), "scheduler": scheduler})


@contextmanager
def stage_worker(address: str | None, workspace: str, slots: int):
    """On a remote cluster: a worker in this checkout for the stage tasks (`slots` at once), for as
    long as the flow runs (it dies with this process, even on kill -9). Nothing on a local cluster."""
    if not address:
        yield
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", f"stages-{workspace}",
                               "--nthreads", str(slots), "--resources", f"{workspace}={slots}", "--no-nanny", "--no-dashboard",
                               "--memory-limit", "0"],
                              env=env, preexec_fn=_die_with_parent)
    try:
        yield
    finally:
        stop_process(worker)


def _worker_name() -> str:
    from distributed import get_worker

    try:
        return str(get_worker().name)
    except ValueError:  # not on a Dask worker (a task called directly)
        return "local"


@task(cache_policy=NO_CACHE)
def run_stage(stage: str, parent_run_id: str | None, spool_dir: str | None = None) -> dict:
    """`dvc repro --single-item <stage>` in this worker's checkout, on the worker's device (its
    CUDA_VISIBLE_DEVICES); its MLflow runs go to `spool_dir` (tracking.replay) if given."""
    logger = get_run_logger()
    env = {**os.environ, **({tracking.PARENT_ENV: parent_run_id} if parent_run_id else {})}
    if spool_dir:
        env[tracking.SPOOL_ENV] = spool_dir
    # dvc.yaml's commands call `python`: the interpreter running this worker.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    worker = _worker_name()
    logger.info(f"{stage}: starting on worker {worker}")
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
    return {"task": stage, "seconds": seconds, "worker": worker}


@task(cache_policy=NO_CACHE)
def publish_inputs(params: dict, setting: str, kind: str) -> dict[str, str]:
    """Put the files the setting's chunks of `kind` read into the store: their manifest {path: md5}."""
    return chunks.publish_inputs(params, setting, chunks.store_of(params), kind)


@task(cache_policy=NO_CACHE)
def run_chunk(params: dict, chunk: dict, inputs: dict[str, str]) -> dict:
    """One chunk, in this worker's checkout: fetch its inputs, compute it into the store unless
    the store holds it (chunks.run_chunk)."""
    logger = get_run_logger()
    job = chunks.Chunk.from_dict(chunk)
    worker = _worker_name()
    logger.info(f"{job.label()}: starting on worker {worker}")
    start = time.perf_counter()
    key = chunks.run_chunk(params, job, chunks.store_of(params), inputs)
    seconds = time.perf_counter() - start
    logger.info(f"{job.label()}: done in {seconds:.1f} s (key {key[:12]})")
    return {"task": job.label(), "seconds": seconds, "worker": worker, "key": key}


def fanned_stages(params: dict) -> dict[str, tuple[str, str, str | None, str | None]]:
    """The stages that fan out into chunks, by DVC name: (kind, setting, method, condense)."""
    from unlearnops.layout import settings

    fanned = {}
    for setting in settings(params):
        fanned[f"retrain@{setting}"] = ("retrain", setting, None, None)
        for method in params["unlearn"]["methods"]:
            fanned[f"unlearn@{setting}-{method}"] = ("unlearn", setting, method, None)
        for method in params["unlearn"].get("layered", []):
            fanned[f"unlearn_layered@{setting}-{method}"] = ("unlearn", setting, method, None)
        for method in params.get("condense", {}).get("methods", []):
            fanned[f"unlearn_blend@{setting}-{method}"] = ("unlearn", setting, method, "blend")
    return fanned


def plan(params: dict, graph: dict[str, list[str]]) -> dict[str, dict]:
    """Every task of a run, in submission order: name -> {"kind": stage | publish | chunk, "after":
    the tasks it waits for, and what it runs}. Without a store (params `runtime.store`) only stages."""
    fanned = fanned_stages(params) if chunks.store_of(params) else {}
    publish_after: dict[tuple[str, str], set[str]] = {}
    for stage, (kind, setting, _, _) in fanned.items():  # a setting's inputs: what its chunked stages wait for, bar each other
        publish_after.setdefault((setting, kind), set()).update(d for d in graph.get(stage, []) if d not in fanned)
    tasks: dict[str, dict] = {}
    for stage, after in graph.items():
        waits = list(after)
        if stage in fanned:
            kind, setting, method, condense = fanned[stage]
            publish = f"publish {setting} {kind}"
            if publish not in tasks:
                tasks[publish] = {"kind": "publish", "after": sorted(publish_after[(setting, kind)]), "setting": setting, "input_kind": kind}
            for chunk in chunks.plan(params, setting, kind, method, condense):
                name = chunk.label()
                tasks[name] = {"kind": "chunk", "after": [publish], "chunk": chunk.to_dict()}
                waits.append(name)
        tasks[stage] = {"kind": "stage", "after": waits}
    return tasks


def resources(kind: str, workspace: str, local: bool) -> dict[str, int]:
    """What a task holds: a chunk a GPU slot anywhere; a stage or a publish this checkout's
    workspace (on a local cluster every worker, each with its GPU slot; else the flow's stage worker)."""
    if kind == "chunk":
        return {GPU: 1}
    return {workspace: 1, GPU: 1} if local else {workspace: 1}


@flow(name="benchmark-tasks")
def run_tasks(workspace: str, parent_run_id: str | None, spool_dir: str | None) -> list[dict]:
    """The stage and chunk tasks of `plan` on the flow's task runner (Dask)."""
    params = load_params()
    local = not params["ops"]["benchmark"].get("cluster")
    futures, tasks = {}, plan(params, stage_graph())
    for name, spec in tasks.items():  # in dependency order
        after = [futures[a] for a in spec["after"]]
        with dask.annotate(resources=resources(spec["kind"], workspace, local)):
            if spec["kind"] == "stage":
                futures[name] = run_stage.submit(name, parent_run_id, spool_dir, wait_for=after)
            elif spec["kind"] == "publish":
                futures[name] = publish_inputs.submit(params, spec["setting"], spec["input_kind"], wait_for=after)
            else:
                futures[name] = run_chunk.submit(params, spec["chunk"], after[0])
    try:
        results = [futures[name].result() for name in tasks]  # in dependency order: the first error raised is a cause, not a task left waiting
        return [result for result, spec in zip(results, tasks.values()) if spec["kind"] != "publish"]
    finally:
        for future in futures.values():
            future.wait()  # every task has finished or failed before the flow's runs are logged


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
    (like `unlearnops repro`): one row per stage and chunk task with its seconds and worker."""
    params = load_params()
    cfg = params["ops"]["benchmark"]
    workspace = f"{WORKSPACE_PREFIX}{uuid.uuid4().hex[:12]}"  # this run's checkout; another run's workers never take its stages
    mlflow = tracking.configure(params)
    with mlflow.start_run(run_name="pipeline", tags={"unlearnops.stage": "pipeline", "orchestrator": "prefect"}) as run, \
            tempfile.TemporaryDirectory(prefix="unlearnops-spool-") as spool, \
            stage_worker(cfg.get("cluster"), workspace, int(cfg["max_parallel"])):
        try:
            return run_tasks.with_options(task_runner=task_runner(params, workspace))(workspace, run.info.run_id, spool)
        finally:
            tracking.replay(params, spool, run.info.run_id)


def deploy_to_pool() -> str:
    pool = load_params()["ops"]["work_pool"]
    return deploy(benchmark, "flows/benchmark.py:benchmark", "benchmark", pool)


if __name__ == "__main__":
    if sys.argv[1:] == ["deploy"]:
        print(f"deployment {deploy_to_pool()}")
        sys.exit(0)
    # Dask workers run the tasks in their own processes: they reach this run through a Prefect
    # server (PREFECT_API_URL, else a private one for the run; Prefect's ephemeral mode would start one per worker).
    params = load_params()
    home = Path(".prefect/benchmark")  # not .prefect: `make serve`'s server may hold that database
    home.mkdir(parents=True, exist_ok=True)
    with prefect_api(home, params["ops"]["prefect_startup_timeout_s"]):
        for row in benchmark():
            print(f"{row['task']:<56} {row['seconds']:8.1f} s  {row['worker']}")
