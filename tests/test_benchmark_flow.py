"""The benchmark flow (flows/benchmark.py): its plan of tasks, and real runs on Dask.

The multi-worker test is the issue's (#17): a Dask scheduler on 127.0.0.1, two workers each in its
own copy of the repository (as two hosts would be), a local-folder store; the tiny grid's N models
in chunks of 2 run to completion, equal the single-process run, and one worker killed (SIGKILL)
while it runs a chunk leaves a run that completes: Dask reruns the chunk on the other worker and
the store holds every chunk once.
"""
from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from conftest import PIPELINE_FILES, REPO, tiny
from flows import benchmark as benchmark_flow
from unlearnops import chunks
from unlearnops.layout import setting_layout
from unlearnops.outputs import RunOutputs
from unlearnops.stack import ModelStack

SETTING = "synthetic-random-5"


def test_gpu_ids_and_local_workers(repo_params, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert benchmark_flow.gpu_ids("auto") == ["2", "3"]
    assert benchmark_flow.gpu_ids([0, 1]) == ["0", "1"]
    with pytest.raises(ValueError, match="must be 'auto' or a list"):
        benchmark_flow.gpu_ids("0,1")
    params = copy.deepcopy(repo_params)
    params["ops"]["benchmark"]["gpus"] = "auto"  # one worker per GPU, each seeing only its own
    workers = benchmark_flow.local_workers(params, "workspace-x")
    assert {name: w["options"]["env"] for name, w in workers.items()} == {"gpu-2": {"CUDA_VISIBLE_DEVICES": "2"},
                                                                          "gpu-3": {"CUDA_VISIBLE_DEVICES": "3"}}
    assert all(w["options"]["nthreads"] == 1 and w["options"]["resources"] == {"GPU": 1, "workspace-x": 1} for w in workers.values())
    params["ops"]["benchmark"].update(gpus=[], max_parallel=3)  # no GPU: max_parallel CPU workers, one slot each
    workers = benchmark_flow.local_workers(params, "workspace-x")
    assert sorted(workers) == ["cpu-0", "cpu-1", "cpu-2"] and all(w["options"]["env"] == {} for w in workers.values())


def test_task_runner_is_a_local_cluster_or_the_configured_scheduler(repo_params):
    params = copy.deepcopy(repo_params)
    params["ops"]["benchmark"].update(gpus=[], max_parallel=2)
    local = benchmark_flow.task_runner(params, "workspace-x")
    assert local.address is None and sorted(local.cluster_kwargs["workers"]) == ["cpu-0", "cpu-1"]
    params["ops"]["benchmark"]["cluster"] = "tcp://10.0.0.5:8786"
    remote = benchmark_flow.task_runner(params, "workspace-x")
    assert remote.address == "tcp://10.0.0.5:8786" and not remote.cluster_kwargs
    assert benchmark_flow.resources("chunk", "workspace-x", local=False) == {"GPU": 1}  # any worker with a device slot
    assert benchmark_flow.resources("stage", "workspace-x", local=False) == {"workspace-x": 1}  # only this checkout's worker
    assert benchmark_flow.resources("stage", "workspace-x", local=True) == {"workspace-x": 1, "GPU": 1}


def test_stage_graph_is_dvcs_graph_in_dependency_order(repo_copy, monkeypatch):
    monkeypatch.chdir(repo_copy)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], check=True)
    graph = benchmark_flow.stage_graph()
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert sorted(graph) == sorted(listed)
    order = list(graph)
    assert order[0] == "split@digits" and order[-1] == "report"
    assert all(order.index(dep) < order.index(stage) for stage, deps in graph.items() for dep in deps)
    assert graph["unlearn@digits-random-2-finetune"] == ["inputs@digits-random-2", "prepare@digits-random-2", "retrain@digits-random-2"]
    assert graph["inputs@digits-random-2"] == ["split@digits", "train_target@digits"]


def test_plan_fans_the_chunked_stages_out_after_their_inputs(repo_copy, repo_params, monkeypatch, tmp_path):
    """Without a store the plan is DVC's stages; with one, every retrain and unlearning stage waits
    for its chunks, which cover its N seeds once, in order, and wait for the setting's inputs
    to be published once the stages that make them (not the other chunked stages) ran."""
    monkeypatch.chdir(repo_copy)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], check=True)
    graph = benchmark_flow.stage_graph()
    params = copy.deepcopy(repo_params)
    assert {name: spec["kind"] for name, spec in benchmark_flow.plan(params, graph).items()} == dict.fromkeys(graph, "stage")

    params["runtime"].update(store=str(tmp_path / "store"), chunk_models=8, models_per_pass=8)
    tasks = benchmark_flow.plan(params, graph)
    order = list(tasks)
    assert all(order.index(dep) < order.index(name) for name, spec in tasks.items() for dep in spec["after"])
    assert [name for name, spec in tasks.items() if spec["kind"] == "stage"] == list(graph)
    fanned = benchmark_flow.fanned_stages(params)
    n_models = params["n_models"]
    for stage, (kind, setting, method, condense) in fanned.items():
        waits = [tasks[d] for d in tasks[stage]["after"] if tasks[d]["kind"] == "chunk"]
        assert len(waits) == n_models // 8
        covered = [seed for spec in waits for seed in spec["chunk"]["seeds"]]
        base = params["retrain" if kind == "retrain" else "unlearn"]["seed"]
        assert covered == list(range(base, base + n_models))
        assert {(c["chunk"]["kind"], c["chunk"]["method"], c["chunk"]["condense"]) for c in waits} == {(kind, method, condense)}
        assert {tuple(c["after"]) for c in waits} == {(f"publish {setting} {kind}",)}
    assert tasks["publish digits-random-2 retrain"]["after"] == ["prepare@digits-random-2", "split@digits"]
    assert tasks["publish digits-random-2 unlearn"]["after"] == ["inputs@digits-random-2", "prepare@digits-random-2"]
    assert "unlearn_blend@digits-random-2-a_amu" in fanned and fanned["unlearn_blend@digits-random-2-a_amu"][3] == "blend"
    assert sum(spec["kind"] == "publish" for spec in tasks.values()) == 2 * len(params["settings"])


@pytest.mark.slow
def test_benchmark_flow_runs_the_dvc_pipeline_on_a_local_cluster(repo_copy, repo_params, prefect_harness, monkeypatch):
    """The embedded default: no store, no cluster address; the stages run on a local Dask cluster."""
    params = tiny(repo_params)
    params["unlearn"]["methods"] = ["finetune", "neggrad_plus"]  # two methods show the parallel branches
    params["condense"]["methods"] = ["finetune"]
    params["data"]["deleted"] = "data/deleted.csv"
    params["mlflow"].update(tracking_uri="sqlite:///mlflow.db", artifact_root="mlartifacts")
    params["ops"]["benchmark"].update(gpus=[], max_parallel=2)
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(REPO / "flows", repo_copy / "flows")
    monkeypatch.chdir(repo_copy)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], check=True)
    rows = benchmark_flow.benchmark()
    assert [r["task"] for r in rows] == list(benchmark_flow.stage_graph())
    assert {r["worker"] for r in rows} <= {"cpu-0", "cpu-1"}
    for setting in params["settings"]:
        for method in params["unlearn"]["methods"]:
            assert (repo_copy / "metrics" / setting / f"{method}.json").is_file()
    assert (repo_copy / "reports" / "index.html").is_file()
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout  # every stage recorded in dvc.lock
    runs = mlflow.search_runs(experiment_names=[params["mlflow"]["experiment"]], output_format="list")
    parent = [r for r in runs if r.data.tags.get("orchestrator") == "prefect"]
    assert len(parent) == 1
    assert sum(r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id for r in runs) >= len(rows)


# ------------------------------------------------------------------ two workers, two working copies


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkout(src: Path, dest: Path) -> Path:
    """A working copy: the repository's pipeline files and the flows, nothing computed."""
    for name in (*PIPELINE_FILES, "flows"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, dest / name)
    return dest


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: killed as a host would die


def _kill_first_worker_that_starts_a_chunk(workers: dict[str, subprocess.Popen], logs: dict[str, Path], killed: dict,
                                           stop: threading.Event) -> None:
    while not stop.is_set():
        for name, log in logs.items():
            started = [line for line in log.read_text().splitlines() if " chunk " in line and ": starting on worker" in line]
            if started:
                os.killpg(workers[name].pid, signal.SIGKILL)
                killed.update(worker=name, chunk=started[0].split(" - ", 1)[-1].split(": starting")[0])
                return
        time.sleep(0.05)


@pytest.mark.slow
def test_two_workers_in_two_checkouts_one_killed_mid_chunk(tmp_path, repo_params, prefect_harness, monkeypatch):
    params = tiny(repo_params)
    params["settings"] = {SETTING: params["settings"][SETTING]}
    params["unlearn"]["methods"] = ["finetune"]
    params["condense"]["methods"] = []
    params["runtime"].update(chunk_models=2, models_per_pass=2, store=str(tmp_path / "store"))  # N = 4: two chunks per stage
    params["data"]["deleted"] = "data/deleted.csv"
    params["mlflow"].update(tracking_uri="sqlite:///mlflow.db", artifact_root="mlartifacts")
    (tmp_path / "store").mkdir()
    port = _free_port()
    params["ops"]["benchmark"].update(gpus=[], max_parallel=2, cluster=f"tcp://127.0.0.1:{port}")
    (tmp_path / "src").mkdir()
    for name in (*(f for f in PIPELINE_FILES if f != "params.yaml"), "flows"):  # params.yaml: this test's own
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / "src" / name)
    (tmp_path / "src" / "params.yaml").write_text(yaml.safe_dump(params))
    here = _checkout(tmp_path / "src", tmp_path / "orchestrator")
    copies = {name: _checkout(tmp_path / "src", tmp_path / name) for name in ("w1", "w2")}
    logs = {name: tmp_path / f"{name}.log" for name in copies}
    started = time.monotonic()
    procs = [_start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                    here, tmp_path / "scheduler.log")]  # it unpickles the tasks: a checkout too
    workers = {name: _start(["distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}", "--name", name, "--nthreads", "1",
                             "--resources", "GPU=1", "--no-nanny", "--no-dashboard", "--memory-limit", "0"], copy_, logs[name])
               for name, copy_ in copies.items()}
    procs += workers.values()
    killed, stop = {}, threading.Event()
    killer = threading.Thread(target=_kill_first_worker_that_starts_a_chunk, args=(workers, logs, killed, stop), daemon=True)
    monkeypatch.chdir(here)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], check=True)
    killer.start()
    try:
        rows = benchmark_flow.benchmark()
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - started
    print(f"multi-worker run: {seconds:.0f} s; killed {killed}")

    # The killed worker's chunk ran again on the other one, and the run completed.
    assert killed, "no worker was seen starting a chunk"
    survivor = next(name for name in copies if name != killed["worker"])
    rerun = [r for r in rows if r["task"] == killed["chunk"]]
    assert len(rerun) == 1 and rerun[0]["worker"] == survivor
    assert f"{killed['chunk']}: starting on worker {survivor}" in logs[survivor].read_text()
    assert (here / "metrics" / SETTING / "finetune.json").is_file() and (here / "reports" / "index.html").is_file()

    # Every chunk is in the store once; the merged runs equal the single-process run (no store: all N in one process).
    plans = {kind: chunks.plan(params, SETTING, kind, method) for kind, method in (("retrain", None), ("unlearn", "finetune"))}
    keys = {chunks.chunk_key(params, chunk) for planned in plans.values() for chunk in planned}
    assert {r["key"] for r in rows if "key" in r} == keys
    stored = sorted(p.name for p in (tmp_path / "store" / "chunks").iterdir())
    assert stored == sorted(keys)
    single = copy.deepcopy(params)
    single["runtime"].update(store=None, chunk_models=None)
    where = setting_layout(params, SETTING)
    for kind, folder in (("retrain", where.retrain), ("unlearn", where.unlearned / "finetune")):
        stack, outputs = chunks.assemble(single, SETTING, kind, "finetune" if kind == "unlearn" else None)
        merged = ModelStack.load(folder / "models.pt")
        assert merged.seeds == stack.seeds and merged.n == params["n_models"]  # each seed merged once, in order
        for name, tensor in {**stack.params, **stack.buffers}.items():
            assert torch.equal(tensor, {**merged.params, **merged.buffers}[name]), (kind, name)
        merged_outputs = RunOutputs.load(folder / "logits.npz")
        for split in outputs.logits:
            assert np.array_equal(outputs.logits[split], merged_outputs.logits[split]), (kind, split)
