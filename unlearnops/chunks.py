"""A stage's N models split into seed chunks: the unit of work a pool of GPU machines shares (#17).

The competition scored every method with 512 unlearned and 512 retrained models; one stage's N
seeds are split into chunks of `runtime.chunk_models` (null: one chunk of all N, as before). A
`Chunk` (retrain, or one unlearning run of a method, with its seeds) is computed by `run_chunk`,
which puts its models.pt, logits.npz and meta.json into a `Store` (unlearnops/store.py) under
`chunk_key`: a hash of everything that determines them (input files' md5, the params that shape
them, the seeds, the code). `assemble` merges a stage's chunks in seed order, computing only those
the store lacks; pipeline.retrain and pipeline.unlearn call it, so `dvc repro` on any host that
sees the store (params `runtime.store`) merges what workers computed and recomputes nothing.

A merged run equals the unchunked one for the same seeds, bit for bit: the engine trains
`runtime.models_per_pass` models per pass, and a pass's result depends only on its models (each
draws its data order from its own seed; in-loss randomness is seeded by the pass's seeds), so
`chunk_models` must be a multiple of models_per_pass (`plan` checks it): every pass then holds the
same models chunked or not. Steps every run of a stage shares (SalUn's mask, Blend's condensed
retain set, conv_transpose_pseudo's quick model) are computed by every chunk from the same inputs
and seed (Unlearner.shared_seed). tests/test_chunks.py checks it across chunkings and methods.
With models_per_pass `auto` a pass is a whole chunk: results then differ with the chunking for
methods with in-loss randomness (random labels) and, in float rounding, for the others.

Time: each chunk's wall clock covers its training or unlearning (and its condensing), as the
unchunked stage's did; a merged run's `wall_seconds` is the sum over its chunks (device-seconds,
whatever the number of machines), its `seconds_per_model` each chunk's wall / its models. One chunk
is exactly the unchunked stage's timing, so `time_vs_retrain` stays comparable.

Workers share nothing but the store: `publish_inputs` uploads the files the chunks read (by md5)
and returns a manifest {path: md5}; a worker, in its own working copy, runs
`python -m unlearnops.chunks run '<chunk json>' --inputs '<manifest json>'`, which fetches the
inputs (`fetch_inputs`, md5-checked, atomic), runs the chunk and pushes it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from unlearnops.config import ConfigError
from unlearnops.files import file_md5, write_json
from unlearnops.layout import Layout, seeds, setting_layout, setting_params
from unlearnops.store import Store

KINDS = ("retrain", "unlearn")
KEY_FORMAT = "unlearnops.chunk/1"
# Runtime keys that change results. models_per_pass does: the engine's in-loss randomness (random
# labels, A-AMU's sampling) is seeded per pass of models and float sums differ with a pass's size.
# device, threads, eval_batch_size (float rounding at most) and chunk_models / store do not.
NUMERIC_RUNTIME = ("bf16", "compile", "models_per_pass")
CODE_EXCLUDED = ("report", "ops", "cli.py", "tracking.py", "progress.py")  # code that computes no model or logit


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Seeds `seeds` of one stage: retrain, or the unlearning run `method` (on the `condense`d
    retain set if given) of setting `setting` (None: the flat layout); `index` is its place."""

    kind: str
    setting: str | None
    method: str | None
    condense: str | None
    index: int
    seeds: tuple[int, ...]

    @property
    def run(self) -> str:
        """The run's folder name: retrain, the method, or `<method>+<condenser>`."""
        if self.kind == "retrain":
            return "retrain"
        return self.method if self.condense is None else f"{self.method}+{self.condense}"

    def label(self) -> str:
        return f"{self.setting or 'flat'}/{self.run} chunk {self.index} (seeds {self.seeds[0]}..{self.seeds[-1]})"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "seeds": list(self.seeds)}

    @classmethod
    def from_dict(cls, entry: dict) -> "Chunk":
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(entry, dict) or set(entry) != set(fields):
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ConfigError(f"a chunk needs exactly the keys {', '.join(fields)}; got {got}")
        chunk = cls(**{**entry, "seeds": tuple(int(s) for s in entry["seeds"])})
        if chunk.kind not in KINDS or (chunk.kind == "unlearn") != (chunk.method is not None) or not chunk.seeds:
            raise ConfigError(f"bad chunk {entry}: kind is one of {KINDS}, an unlearn chunk names its method, a retrain chunk none, seeds not empty")
        return chunk


def _params_layout(params: dict, setting: str | None) -> tuple[dict, Layout]:
    return (params if setting is None else setting_params(params, setting)), setting_layout(params, setting)


def plan(params: dict, setting: str | None, kind: str, method: str | None = None, condense: str | None = None) -> list[Chunk]:
    """The stage's seeds (retrain.seed or unlearn.seed + 0..N-1) in chunks of runtime.chunk_models."""
    if kind not in KINDS or (kind == "unlearn") != (method is not None) or (condense is not None and method is None):
        raise ConfigError(f"plan: kind must be one of {KINDS}; an unlearn stage names its method, retrain none (got {kind}, {method})")
    p, _ = _params_layout(params, setting)
    n = int(p["n_models"])
    every = seeds(int(p["retrain" if kind == "retrain" else "unlearn"]["seed"]), n)
    size = p["runtime"].get("chunk_models") or n
    per_pass = p["runtime"]["models_per_pass"]
    if size < n and per_pass != "auto" and size % per_pass:
        raise ConfigError(f"runtime.chunk_models ({size}) must be a multiple of runtime.models_per_pass ({per_pass}) "
                          "(or null): each pass of the engine must hold the same models chunked or not")
    return [Chunk(kind, setting, method, condense, i, tuple(every[start:start + size])) for i, start in enumerate(range(0, n, size))]


# ---------------------------------------------------------------- keys


def input_files(params: dict, setting: str | None, kind: str) -> dict[str, Path]:
    """What a chunk of `kind` reads, by role: the split's images, the forget set (samples.csv)
    and, to unlearn, the target."""
    where = setting_layout(params, setting)
    files = {"images": where.split / "images.pt", "samples": where.prepared / "samples.csv"}
    if kind == "unlearn":
        files["target"] = where.target / "models.pt"
    return files


def _input_md5s(params: dict, setting: str | None, kind: str) -> dict[str, str]:
    files = input_files(params, setting, kind)
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found: run the split, prepare and train_target stages, "
                                "or fetch the inputs from the store (python -m unlearnops.chunks run ... --inputs MANIFEST)")
    return {role: file_md5(path) for role, path in files.items()}


@functools.cache
def code_md5() -> str:
    """md5 of the library code that computes models and logits: a code change is a new key, as it
    reruns DVC's stages (the report, the operations code, the command line and logging are left out)."""
    package = Path(__file__).resolve().parent
    digest = hashlib.md5()
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative.split("/")[0] not in CODE_EXCLUDED:
            digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _method_chain(p: dict, method: str) -> list[str]:
    """The method and the methods it runs (methods.<m>.base, transitively: layered)."""
    chain = [method]
    while isinstance(base := (p["methods"].get(chain[-1]) or {}).get("base"), str) and base in p["methods"] and base not in chain:
        chain.append(base)
    return chain


def key_params(p: dict, chunk: Chunk) -> dict:
    """The params that shape a chunk's models and logits (p: the setting's params)."""
    shaped = {
        "model": p["model"],
        "evaluate": {k: p["evaluate"][k] for k in ("retain_max_samples", "seed")},  # which retain samples get logits
        "runtime": {k: p["runtime"][k] for k in NUMERIC_RUNTIME},
    }
    if chunk.kind == "retrain":
        shaped["train"] = {k: p["train"][k] for k in ("fit", "augment")}
    else:
        shaped["train"] = {k: p["train"][k] for k in ("augment", "seed")}  # muso starts from train.seed's initial head
        shaped["unlearn_seed"] = p["unlearn"]["seed"]  # seed of the steps every run shares (Unlearner.shared_seed)
        shaped["methods"] = {m: p["methods"][m] for m in _method_chain(p, chunk.method)}
        if chunk.condense is not None:
            shaped["condense"] = {chunk.condense: p["condense"][chunk.condense]}
    return shaped


def _key_inputs(params: dict, chunk: Chunk, md5s: dict[str, str] | None = None) -> dict:
    p, _ = _params_layout(params, chunk.setting)
    return {"format": KEY_FORMAT, "code": code_md5(), "kind": chunk.kind, "method": chunk.method, "condense": chunk.condense,
            "seeds": list(chunk.seeds), "inputs": md5s or _input_md5s(params, chunk.setting, chunk.kind), "params": key_params(p, chunk)}


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def chunk_key(params: dict, chunk: Chunk) -> str:
    """Content key of a chunk's result: the same on any host for the same inputs, params, seeds and code."""
    return _hash(_key_inputs(params, chunk))


# ---------------------------------------------------------------- computing


def trained(p: dict, data, split_name: str, seed_list: list[int], runtime, desc: str):
    """Models trained from scratch on `split_name`, one per seed, and their logits: (ModelStack,
    RunOutputs). The target's and retraining's one code path."""
    from unlearnops.config import build_dataclass
    from unlearnops.nets import model_spec
    from unlearnops.outputs import eval_parts, run_outputs
    from unlearnops.training import FitConfig, Stream, train_from_scratch

    spec = model_spec(p, data.num_classes, data.in_channels, data.image_size)
    fit = build_dataclass(FitConfig, p["train"]["fit"], "train.fit")
    stream = Stream(data[split_name].x, data[split_name].y, p["train"]["fit"]["batch_size"], bool(p["train"]["augment"]))
    stack, wall = train_from_scratch(spec, seed_list, stream, fit, runtime, desc=desc)
    return stack, run_outputs(stack, eval_parts(data, p["evaluate"]["retain_max_samples"], p["evaluate"]["seed"]), runtime, wall)


def unlearned(p: dict, data, target, method_name: str, condense: str | None, seed_list: list[int], runtime):
    """Runs `seed_list` of `method_name` from the target (after condensing retain with `condense`,
    timed too) and their logits: (ModelStack, RunOutputs, condensed sizes or None)."""
    from unlearnops import methods
    from unlearnops.outputs import eval_parts, run_outputs
    from unlearnops.stack import ModelStack

    method = methods.get_method(method_name, p)
    method.shared_seed = int(p["unlearn"]["seed"])  # run 0 of the whole stage, whichever chunk this is
    retain, sizes = data["retain"], None
    start = time.perf_counter()
    if condense is not None:
        from unlearnops import condense as condense_lib

        condensed = condense_lib.condense(condense, p, retain, data["forget"], target, runtime)
        retain = condensed.retain
        sizes = {"retain_before": len(data["retain"]), "retain_after": len(retain), "kept": condensed.n_kept, "blended": condensed.n_blended}
    unlearn_data = methods.UnlearnData(retain, data["forget"], data["val"], data.num_classes, bool(p["train"]["augment"]))
    stack = method.unlearn(ModelStack.replicate(target, seed_list), unlearn_data, runtime)
    wall = time.perf_counter() - start
    return stack, run_outputs(stack, eval_parts(data, p["evaluate"]["retain_max_samples"], p["evaluate"]["seed"]), runtime, wall), sizes


def compute(params: dict, chunk: Chunk):
    """A chunk's models and logits, computed here from the local inputs: (ModelStack, RunOutputs, meta)."""
    from unlearnops import data as data_lib
    from unlearnops.stack import ModelStack
    from unlearnops.training import Runtime

    p, where = _params_layout(params, chunk.setting)
    runtime = Runtime.from_params(p)
    data = data_lib.load_prepared(where.prepared, where.split)
    meta = {"chunk": chunk.to_dict(), "host": socket.gethostname(), "device": runtime.device}
    if chunk.kind == "retrain":
        stack, outputs = trained(p, data, "retain", list(chunk.seeds), runtime, desc=f"retrain {chunk.index}")
    else:
        target = ModelStack.load(where.target / "models.pt")
        stack, outputs, meta["condense"] = unlearned(p, data, target, chunk.method, chunk.condense, list(chunk.seeds), runtime)
    meta["wall_seconds"] = outputs.wall_seconds
    return stack, outputs, meta


def run_chunk(params: dict, chunk: Chunk, store: Store, inputs: dict[str, str] | None = None) -> str:
    """Compute `chunk` into `store` unless the store holds it; return its key. With `inputs` (a
    manifest of publish_inputs) the input files are fetched first where missing or different."""
    if inputs:
        fetch_inputs(inputs, store)
    key_inputs = _key_inputs(params, chunk)
    key = _hash(key_inputs)
    if store.has(key):
        return key
    stack, outputs, meta = compute(params, chunk)
    with tempfile.TemporaryDirectory(prefix="unlearnops-chunk-") as tmp:
        stack.save(Path(tmp) / "models.pt")
        outputs.save(Path(tmp) / "logits.npz")
        write_json(Path(tmp) / "meta.json", {**meta, "key": key, "key_inputs": key_inputs})
        store.put(key, tmp)
    return key


def load_chunk(store: Store, key: str, chunk: Chunk):
    """A stored chunk: (ModelStack, RunOutputs, meta)."""
    from unlearnops.outputs import RunOutputs
    from unlearnops.stack import ModelStack

    with tempfile.TemporaryDirectory(prefix="unlearnops-chunk-") as tmp:
        folder = store.get(key, tmp, chunk.label())
        stack, outputs, meta = ModelStack.load(folder / "models.pt"), RunOutputs.load(folder / "logits.npz"), json.loads((folder / "meta.json").read_text())
    if stack.seeds != list(chunk.seeds) or outputs.n_models != len(chunk.seeds):
        raise ValueError(f"store {store.url}: chunk {key} holds seeds {stack.seeds}, not those of {chunk.label()} (a corrupt store)")
    return stack, outputs, meta


def merge_outputs(parts: list):
    """Chunks' RunOutputs in order as one: logits and per-model seconds concatenated, wall summed."""
    from unlearnops.outputs import RunOutputs

    first = parts[0]
    for other in parts[1:]:
        if set(other.logits) != set(first.logits) or any(not np.array_equal(other.ids[s], first.ids[s]) for s in first.ids):
            raise ValueError("chunks disagree on the evaluated samples: they were computed from different inputs")
    return RunOutputs({s: np.concatenate([o.logits[s] for o in parts]) for s in first.logits}, first.labels, first.ids,
                      np.concatenate([o.seconds_per_model for o in parts]), float(sum(o.wall_seconds for o in parts)))


def assemble_with_meta(params: dict, setting: str | None, kind: str, method: str | None = None, condense: str | None = None,
                       store: Store | None = None):
    """`assemble`, with each chunk's meta.json (its host, device, wall time, condensed sizes)."""
    from unlearnops.progress import bar
    from unlearnops.stack import ModelStack

    chunk_list = plan(params, setting, kind, method, condense)
    results = []
    for chunk in chunk_list if len(chunk_list) == 1 else bar(chunk_list, desc=f"{kind} chunks"):
        if store is None:
            results.append(compute(params, chunk))
        else:
            results.append(load_chunk(store, run_chunk(params, chunk, store), chunk))
    stack = ModelStack.concat([r[0] for r in results])
    return stack, merge_outputs([r[1] for r in results]), [r[2] for r in results]


def assemble(params: dict, setting: str | None, kind: str, method: str | None = None, condense: str | None = None,
             store: Store | None = None):
    """The stage's N models and logits, (ModelStack, RunOutputs), merged from its chunks in seed
    order; chunks the store lacks (all, without a store) are computed here."""
    stack, outputs, _ = assemble_with_meta(params, setting, kind, method, condense, store)
    return stack, outputs


def store_of(params: dict) -> Store | None:
    """The store of params `runtime.store`, None if unset (everything in this process)."""
    url = params["runtime"].get("store")
    return Store(url) if url else None


# ---------------------------------------------------------------- inputs across working copies


def publish_inputs(params: dict, setting: str | None, store: Store, kind: str = "unlearn") -> dict[str, str]:
    """Upload the files the setting's chunks of `kind` read (unlearn: also the target) unless the
    store holds them; return the manifest {path relative to the working copy: md5}."""
    files = input_files(params, setting, kind)
    _input_md5s(params, setting, kind)  # every file present, or one error naming them
    return {path.as_posix(): store.put_file(path) for path in files.values()}


def fetch_inputs(manifest: dict[str, str], store: Store, root: str | Path = ".") -> list[Path]:
    """Materialise a manifest's files under `root` (atomically, md5-checked); a file already there
    with its md5 is kept. Returns the files fetched."""
    fetched = []
    for relative, md5 in manifest.items():
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise ConfigError(f"input manifest path {relative!r} must be relative to the working copy")
        dest = Path(root) / relative
        if not (dest.is_file() and file_md5(dest) == md5):
            fetched.append(store.get_file(md5, dest))
    return fetched


# ---------------------------------------------------------------- worker command line


def _json_arg(text: str, what: str):
    """A JSON argument given inline or as a file path."""
    try:
        return json.loads(Path(text).read_text() if not text.lstrip().startswith(("{", "[")) and Path(text).is_file() else text)
    except (json.JSONDecodeError, OSError) as err:
        raise ConfigError(f"{what} is neither JSON nor a JSON file: {err}") from None


def main(argv: list[str] | None = None) -> int:
    """`python -m unlearnops.chunks run CHUNK [--inputs MANIFEST] [--store URL]`: a worker's entry
    (prints the chunk's key); `plan` prints a stage's chunks, one JSON per line; `publish` uploads
    a setting's inputs and prints their manifest. Errors: one line, exit codes of unlearnops/ops/errors.py."""
    import os

    from unlearnops.ops import errors
    from unlearnops.params_schema import load_checked_params

    parser = errors.OneLineParser(prog="python -m unlearnops.chunks")
    parser.add_argument("--params", default=os.environ.get("UNLEARNOPS_PARAMS", "params.yaml"))
    parser.add_argument("--store", help="store URL (default: params runtime.store)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="fetch the inputs, compute one chunk into the store (nothing if stored), print its key")
    run.add_argument("chunk", help="the chunk as JSON (Chunk.to_dict), inline or a file")
    run.add_argument("--inputs", help="manifest {path: md5} of publish_inputs, inline or a file")
    for name in ("plan", "publish"):
        sub = commands.add_parser(name, help="print a stage's chunks (JSON lines)" if name == "plan" else "upload a setting's inputs, print the manifest")
        sub.add_argument("--setting", help="a setting of params.yaml (default: the flat layout)")
        sub.add_argument("--kind", choices=KINDS, default="unlearn")
        if name == "plan":
            sub.add_argument("--method")
            sub.add_argument("--condense")
    args = parser.parse_args(argv)
    try:
        params = load_checked_params(args.params)
        store = Store(args.store) if args.store else store_of(params)
        if args.command == "plan":
            for chunk in plan(params, args.setting, args.kind, args.method if args.kind == "unlearn" else None, args.condense):
                print(json.dumps(chunk.to_dict()))
            return errors.OK
        if store is None:
            raise ConfigError("no store: set params runtime.store or pass --store URL")
        if args.command == "publish":
            print(json.dumps(publish_inputs(params, args.setting, store, args.kind)))
        else:
            print(run_chunk(params, Chunk.from_dict(_json_arg(args.chunk, "chunk")), store, _json_arg(args.inputs, "--inputs") if args.inputs else None))
    except Exception as err:
        return errors.report(err, f"chunks {args.command}: ")
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
