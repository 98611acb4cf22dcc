"""A stage's N models in seed chunks through a store (unlearnops/chunks.py, unlearnops/store.py, #17):
merged chunks equal the unchunked run bit for bit, across chunkings, for retraining and for methods
with per-run randomness (random_label), a shared step (salun's mask, Blend's condensed retain set,
conv_transpose_pseudo's quick model); the store is never asked to recompute what it holds; keys
are stable across processes and follow exactly the inputs and params that shape a chunk; a worker
in a second working copy that shares only the store computes a chunk the first copy merges; an
interrupted upload leaves no visible key."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, tiny
from unlearnops import chunks
from unlearnops import data as data_lib
from unlearnops.config import ConfigError
from unlearnops.layout import FLAT
from unlearnops.store import NotInStore, Store, StoreError
from unlearnops.training import Runtime

RUNS = [("retrain", None, None), ("unlearn", "finetune", None), ("unlearn", "random_label", None), ("unlearn", "salun", None),
        ("unlearn", "conv_transpose_pseudo", None), ("unlearn", "a_amu", "blend")]


@pytest.fixture(scope="module")
def upstream(repo_params, tmp_path_factory) -> tuple[dict, Path]:
    """A working copy (flat layout) with the upstream outputs: prepared data and a target; tiny
    params, one model per engine pass so that every chunking keeps the engine's passes."""
    root = tmp_path_factory.mktemp("copy")
    params = tiny(repo_params)
    params["runtime"]["models_per_pass"] = 1
    params["data"]["deleted"] = "deleted.csv"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        data_lib.prepare(params, FLAT.prepared)
        data = data_lib.load_prepared(FLAT.prepared)
        target, _ = chunks.trained(params, data, "train", [int(params["train"]["seed"])], Runtime.from_params(params), "target")
        target.save(FLAT.target / "models.pt")
    finally:
        os.chdir(cwd)
    return params, root


@pytest.fixture()
def params(upstream, monkeypatch) -> dict:
    base, root = upstream
    monkeypatch.chdir(root)
    return json.loads(json.dumps(base))


def _with(params: dict, **runtime) -> dict:
    changed = json.loads(json.dumps(params))
    changed["runtime"].update(runtime)
    return changed


def _assert_same(a, b) -> None:
    (stack_a, out_a), (stack_b, out_b) = a, b
    assert stack_a.seeds == stack_b.seeds
    for k in stack_a.params:
        assert torch.equal(stack_a.params[k], stack_b.params[k]), k
    for k in stack_a.buffers:
        assert torch.equal(stack_a.buffers[k], stack_b.buffers[k]), k
    assert set(out_a.logits) == set(out_b.logits)
    for split in out_a.logits:
        np.testing.assert_array_equal(out_a.logits[split], out_b.logits[split])
        np.testing.assert_array_equal(out_a.ids[split], out_b.ids[split])


@pytest.mark.parametrize("kind, method, condense", RUNS, ids=[m or k if c is None else f"{m}+{c}" for k, m, c in RUNS])
def test_merged_chunks_equal_the_unchunked_run(params, kind, method, condense):
    whole = chunks.assemble(params, None, kind, method, condense)
    assert whole[0].n == 4 and whole[1].n_models == 4
    for size in (1,) if kind == "unlearn" else (3, 1):  # N=4 as [3, 1] and [1, 1, 1, 1] (one model per pass: any chunking keeps the passes)
        chunked = _with(params, chunk_models=size)
        assert [len(c.seeds) for c in chunks.plan(chunked, None, kind, method, condense)] == {1: [1] * 4, 2: [2, 2], 3: [3, 1]}[size]
        merged = chunks.assemble(chunked, None, kind, method, condense)
        _assert_same(merged, whole)
        assert merged[1].seconds_per_model.shape == (4,) and merged[1].wall_seconds > 0


def test_chunks_keep_the_engines_passes(params):
    """A chunk cut through a pass of the engine would change the pass's models: refused."""
    with pytest.raises(ConfigError, match=r"chunk_models \(3\) must be a multiple of runtime.models_per_pass \(2\)"):
        chunks.plan(_with(params, chunk_models=3, models_per_pass=2), None, "retrain")
    two = _with(params, chunk_models=2, models_per_pass=2)
    _assert_same(chunks.assemble(two, None, "unlearn", "random_label"), chunks.assemble(_with(two, chunk_models=None), None, "unlearn", "random_label"))


def test_the_store_is_not_asked_twice(params, tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    chunked = _with(params, chunk_models=2)
    real = chunks.compute
    first = chunks.assemble(chunked, None, "unlearn", "finetune", store=store)
    assert len(list((tmp_path / "store" / "chunks").iterdir())) == 2
    monkeypatch.setattr(chunks, "compute", lambda *a: pytest.fail("recomputed a stored chunk"))
    _assert_same(chunks.assemble(chunked, None, "unlearn", "finetune", store=store), first)
    # N grows from 4 to 6: only the new chunk is computed
    computed = []
    monkeypatch.setattr(chunks, "compute", lambda p, c: computed.append(c.seeds) or real(p, c))
    grown = chunks.assemble({**chunked, "n_models": 6}, None, "unlearn", "finetune", store=store)
    assert computed == [(2004, 2005)] and grown[0].seeds == list(range(2000, 2006))
    for k in first[0].params:  # the first four models are the stored ones
        assert torch.equal(grown[0].params[k][:4], first[0].params[k])
    np.testing.assert_array_equal(grown[1].logits["test"][:4], first[1].logits["test"])


def test_keys_follow_what_shapes_a_chunk(params):
    chunk = chunks.plan(params, None, "unlearn", "finetune")[0]
    key = chunks.chunk_key(params, chunk)
    code = "import json, sys; from unlearnops import chunks; p = json.load(sys.stdin); print(chunks.chunk_key(p, chunks.Chunk.from_dict(p.pop('chunk'))))"
    other_process = subprocess.run([sys.executable, "-c", code], input=json.dumps({**params, "chunk": chunk.to_dict()}), text=True,
                                   capture_output=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.strip()
    assert other_process == key
    for harmless in ({"device": "cuda"}, {"threads": 2}, {"eval_batch_size": 7}, {"chunk_models": 2}, {"store": "s3://x"}):
        assert chunks.chunk_key(_with(params, **harmless), chunk) == key, harmless
    changed = json.loads(json.dumps(params))
    changed["methods"]["finetune"]["fit"]["lr"] = 0.05
    assert chunks.chunk_key(changed, chunk) != key
    assert chunks.chunk_key(_with(params, models_per_pass=2), chunk) != key
    changed = json.loads(json.dumps(params))
    changed["methods"]["salun"]["fit"]["lr"] = 0.05  # another method's params: same key
    assert chunks.chunk_key(changed, chunk) == key
    retrain = chunks.plan(params, None, "retrain")[0]
    retrain_key = chunks.chunk_key(params, retrain)
    assert chunks.chunk_key(changed, retrain) == retrain_key
    samples = FLAT.prepared / "samples.csv"
    original = samples.read_bytes()
    try:
        samples.write_bytes(original + b"\n")  # another forget set, as far as the key can tell
        assert chunks.chunk_key(params, chunk) != key
        assert chunks.chunk_key(params, retrain) != retrain_key
    finally:
        samples.write_bytes(original)


def test_a_worker_in_another_working_copy_shares_only_the_store(params, tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    manifest = chunks.publish_inputs(params, None, store)
    assert set(manifest) == {"data/prepared/images.pt", "data/prepared/samples.csv", "models/target/models.pt"}
    worker = tmp_path / "worker"
    shutil.copytree(REPO / "unlearnops", worker / "unlearnops", ignore=shutil.ignore_patterns("__pycache__"))
    chunked = _with(params, chunk_models=2)
    (worker / "params.yaml").write_text(yaml.safe_dump(chunked))
    second = chunks.plan(chunked, None, "unlearn", "random_label")[1]
    run = subprocess.run([sys.executable, "-m", "unlearnops.chunks", "--store", store.url, "run", json.dumps(second.to_dict()),
                          "--inputs", json.dumps(manifest)], cwd=worker, text=True, capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(worker), "UNLEARNOPS_PROGRESS": "off"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == chunks.chunk_key(chunked, second)
    assert (worker / "models/target/models.pt").is_file()  # fetched, md5-checked
    real = chunks.compute
    computed = []
    monkeypatch.setattr(chunks, "compute", lambda p, c: computed.append(c.index) or real(p, c))
    merged = chunks.assemble(chunked, None, "unlearn", "random_label", store=store)
    assert computed == [0]  # the worker's chunk came from the store
    _assert_same(merged, chunks.assemble(params, None, "unlearn", "random_label"))


def test_an_interrupted_upload_leaves_no_key(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    local = tmp_path / "chunk"
    local.mkdir()
    (local / "models.pt").write_bytes(b"weights")
    (local / "logits.npz").write_bytes(b"logits")
    moves = []
    real_mv = store.fs.mv

    def crash_after_one(*args, **kwargs):
        if moves:
            raise OSError("connection reset")
        moves.append(args)
        return real_mv(*args, **kwargs)

    monkeypatch.setattr(store.fs, "mv", crash_after_one)
    with pytest.raises(StoreError, match="unreachable while uploading k1: OSError: connection reset"):
        store.put("k1", local)
    assert not store.has("k1")
    with pytest.raises(NotInStore, match="has no chunk k1"):
        store.get("k1", tmp_path / "out")
    monkeypatch.undo()
    store.put("k1", local)
    assert store.has("k1") and (store.get("k1", tmp_path / "out") / "models.pt").read_bytes() == b"weights"


def test_store_errors_are_one_line(tmp_path, params):
    with pytest.raises(StoreError, match="nosuchproto://x cannot be opened") as err:
        Store("nosuchproto://x")
    assert "\n" not in str(err.value)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(NotInStore, match="has no file 0+ .*publish the inputs"):
        store.get_file("0" * 32, tmp_path / "x")
    run = subprocess.run([sys.executable, "-m", "unlearnops.chunks", "--params", str(tmp_path / "none.yaml"), "run", "{}"],
                         text=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "none.yaml" in run.stderr


@pytest.mark.slow  # MLflow runs of the real stages
def test_the_retrain_and_unlearn_stages_merge_from_the_store(params, tmp_path, monkeypatch):
    """pipeline.retrain / pipeline.unlearn with runtime.store: the chunks go through the store, the
    stage's outputs are the merged run, and a second run of the stage (another host's `dvc repro`)
    computes nothing the store holds."""
    from unlearnops import pipeline
    from unlearnops.outputs import RunOutputs
    from unlearnops.stack import ModelStack

    stored = _with(params, chunk_models=2, store=str(tmp_path / "store"))
    stored["mlflow"].update(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "mlartifacts"))
    pipeline.retrain(stored)
    pipeline.unlearn(stored, "a_amu", condense="blend")
    assert len(list((tmp_path / "store" / "chunks").iterdir())) == 4
    for folder, run in ((FLAT.retrain, ("retrain", None, None)), (FLAT.unlearned / "a_amu+blend", ("unlearn", "a_amu", "blend"))):
        _assert_same((ModelStack.load(folder / "models.pt"), RunOutputs.load(folder / "logits.npz")), chunks.assemble(params, None, *run))
    sizes = json.loads((FLAT.unlearned / "a_amu+blend" / "condense.json").read_text())
    assert sizes["retain_after"] == sizes["kept"] + sizes["blended"] < sizes["retain_before"]
    summary = json.loads((FLAT.metrics / "retrain.json").read_text())
    walls = [json.loads((d / "meta.json").read_text())["wall_seconds"] for d in (tmp_path / "store" / "chunks").iterdir()
             if json.loads((d / "meta.json").read_text())["chunk"]["kind"] == "retrain"]
    assert summary["wall_seconds"] == pytest.approx(sum(walls)) and summary["seconds_per_model"] == pytest.approx(sum(walls) / 4)
    monkeypatch.setattr(chunks, "compute", lambda *a: pytest.fail("recomputed a stored chunk"))
    pipeline.retrain(stored)
    pipeline.unlearn(stored, "a_amu", condense="blend")


def test_fetch_inputs_replaces_stale_files_only(params, tmp_path):
    store = Store(str(tmp_path / "store"))
    manifest = chunks.publish_inputs(params, None, store, kind="retrain")
    assert set(manifest) == {"data/prepared/images.pt", "data/prepared/samples.csv"}
    worker = tmp_path / "worker"
    assert len(chunks.fetch_inputs(manifest, store, worker)) == 2
    (worker / "data/prepared/samples.csv").write_text("stale\n")
    assert chunks.fetch_inputs(manifest, store, worker) == [worker / "data/prepared/samples.csv"]
    assert (worker / "data/prepared/samples.csv").read_bytes() == (FLAT.prepared / "samples.csv").read_bytes()
    with pytest.raises(ConfigError, match="must be relative"):
        chunks.fetch_inputs({"../x": manifest["data/prepared/samples.csv"]}, store, worker)


def test_chunking_and_the_store_rerun_no_dvc_stage():
    """runtime.chunk_models and runtime.store change no result, so no DVC stage lists them."""
    from test_dvc_deps import _param_keys, resolved_stages

    for name, stage in resolved_stages().items():
        for key in ("runtime.chunk_models", "runtime.store"):
            assert not any(key == p or key.startswith(p + ".") for p in _param_keys(stage)), f"{name} reruns when {key} changes"
