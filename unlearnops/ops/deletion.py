"""Deletion requests -> an unlearned candidate model, gated on evidence (flows/deletion.py's work).

A deletion run is a chain of steps; the flow runs each as a Prefect task:
1. `claim`: pending requests (received, or processing after a crash) move to processing. If a
   candidate already awaits review, its requests are claimed too: the new candidate is
   unlearned from the champion for all of them and supersedes the old one, so a reviewer
   always sees one candidate covering every request not yet in the champion.
2. `plan`: choose the method, fix the forget set and write `work.json` into a folder named by
   the work key, a hash of everything the result depends on (requests, champion version,
   data, code, params).
3. `unlearn`: the champion's weights from the registry, the method with N=1 -> candidate.pt.
4. `evaluate`: accuracy on retain/forget/test and a loss-based membership-inference attack
   for the candidate, the champion and (if configured) a model retrained without the forget
   set -> evidence.json.
5. `register`: gate verdicts (params.yaml `ops.gates`); if none fails: ONNX export with its
   parity check and a new registry version with the evidence as tags and alias `candidate`.
   If a gate fails, the run is logged to MLflow and no version is registered.
6. `settle`: requests -> unlearned (with the model version), or failed with the reasons.

Steps 3-5 skip work whose result exists (files in the work folder; a registry version tagged
with the work key), so a run that crashed is finished by the next run without unlearning or
registering twice. A run with nothing pending does nothing.

One run at a time: a run holds the ledger's lease (`holding_lease`, renewed by a heartbeat
thread, expiring `ops.lease_seconds` after the last beat, or at once when the holder's process
on this host is gone); a second run is refused cleanly. Every failure of a run, expected or not,
settles the requests it holds as `failed` with the reason and the error's class (`fail`), in one
ledger transaction; only a run killed outright (kill -9, power loss) leaves them `processing`,
and the next run, once the lease is free, resumes them and marks the dead run's MLflow run
FAILED (`close_dead_runs`).
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from unlearnops import methods, ranking, tracking
from unlearnops.ops import model_registry
from unlearnops.config import ConfigError, build_dataclass
from unlearnops.data import Part, load_prepared, read_deleted_ids
from unlearnops.ops.export import ExportError
from unlearnops.ops.ledger import LEDGER_ENV, Ledger, Status, lease_holder, ledger_url, open_ledger  # noqa: F401  (LEDGER_ENV, ledger_url: also here)
from unlearnops.methods import UnlearnData
from unlearnops.metrics import gaps
from unlearnops.metrics.gaps import loss_auc
from unlearnops.metrics.mia import label_losses, loss_mia
from unlearnops.outputs import eval_parts
from unlearnops.files import write_json
from unlearnops.layout import production_data, samples_table, setting_layout  # noqa: F401  (samples_table: also here)
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Runtime, Stream, predict, train_from_scratch

ACTOR = "deletion-flow"
WORK_FILE, CHAMPION_FILE, CANDIDATE_FILE = "work.json", "champion.pt", "candidate.pt"
TIMING_FILE, EVIDENCE_FILE, GATES_FILE = "unlearn.json", "evidence.json", "gates.json"
SPLITS = ("retain", "forget", "test")


class DeletionError(RuntimeError):
    """A deletion run that cannot succeed as configured; its requests are marked failed."""


class GatesFailed(DeletionError):
    """The candidate failed a gate: nothing was registered, the run's requests are failed with the reason."""


# Failures that are the requests' outcome (marked failed), not crashes (resumed next run).
FAILURES = (DeletionError, ExportError)


@dataclass
class Gates:
    """params.yaml `ops.gates`: what a candidate must show before it is registered."""

    retrain_reference: bool
    max_forget_accuracy_gap: float
    max_mia_auc_gap: float
    max_test_accuracy_drop: float
    max_retain_accuracy_drop: float
    mia_splits: int
    mia_seed: int
    confidence: float

    @classmethod
    def from_params(cls, params: dict) -> "Gates":
        return build_dataclass(cls, params["ops"]["gates"], "ops.gates")


# ------------------------------------------------------------------ settings


DEFAULT_LEASE_SECONDS = 300


@contextmanager
def holding_lease(params: dict, holder: str | None = None):
    """Hold the deletion run's lease for the block (Refused if another live run holds it);
    a daemon thread renews it every third of `ops.lease_seconds`. Yields the holder name."""
    ttl = float(params["ops"].get("lease_seconds", DEFAULT_LEASE_SECONDS))
    ledger, holder = open_ledger(params), holder or lease_holder()
    ledger.acquire_lease(holder, ttl)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(ttl / 3):
            try:
                if not ledger.heartbeat(holder, ttl):
                    return
            except Exception:  # a busy database: try again at the next beat
                continue

    thread = threading.Thread(target=beat, name="deletion-lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        thread.join(timeout=5)
        ledger.release_lease(holder)


def close_dead_runs(params: dict) -> list[str]:
    """Mark deletion runs that MLflow still shows RUNNING as FAILED: called while holding the
    lease, so no live deletion run has one open. Returns their run ids."""
    mlflow_client = model_registry.client(params)
    runs = model_registry.deletion_runs(mlflow_client, params, "attributes.status = 'RUNNING'")
    for run in runs:
        mlflow_client.set_tag(run.info.run_id, "unlearnops.note", "its deletion run died; closed by the next run")
        mlflow_client.set_terminated(run.info.run_id, "FAILED")
    return [run.info.run_id for run in runs]


def data_files(params: dict) -> list[Path]:
    """The files a candidate's data depends on: the production data and the deletion list."""
    folder = production_data(params)
    return [folder / "images.pt", folder / "samples.csv", Path(params["data"]["deleted"])]


def choose_method(params: dict, metrics_dir: Path | None = None) -> tuple[str, str]:
    """The unlearning method and why: `ops.method`, or with `auto` unlearnops.ranking's pick among
    the runs of the last benchmark in `ops.benchmark_setting` (evaluation/<setting>/*.json; or in
    `metrics_dir`) that meet the gates' criteria, else `ops.fallback_method`."""
    wanted = params["ops"]["method"]
    if wanted != "auto":
        methods.get_method(wanted, params)  # unknown names fail with the allowed list
        return wanted, "ops.method"
    if metrics_dir is None:
        metrics_dir = setting_layout(params, params["ops"]["benchmark_setting"]).evidence
    scores = ranking.auto_candidates(ranking.read_results(metrics_dir), params, methods.available())
    if scores:
        return ranking.auto_pick(scores), ranking.auto_reason(scores, str(metrics_dir))
    fallback = params["ops"]["fallback_method"]
    methods.get_method(fallback, params)
    return fallback, f"ops.fallback_method (no benchmarked method in {metrics_dir} has a final_score and meets the gates' criteria)"


# ------------------------------------------------------------------ 1. claim


def _ledger_order(request_ids) -> list[str]:
    return sorted(set(request_ids), key=lambda r: (len(r), r))


def claim(params: dict) -> list[str]:
    """Move pending requests to processing and return the ids this run unlearns ([] = none)."""
    ledger = open_ledger(params)
    pending = ledger.pending()
    if not pending:
        return []
    table = pd.read_csv(samples_table(params))
    train_ids = set(table.loc[table["split"] == "train", "sample_id"].tolist())
    deleted = read_deleted_ids(params["data"]["deleted"])
    claimed = []
    received = [r.id for r in pending if r.status is Status.received]
    if received:  # all at once: a crash leaves none half-claimed
        ledger.transition_many(received, Status.processing, actor=ACTOR, note="claimed by a deletion run")
    for request in pending:  # oldest received first
        missing = sorted(set(request.sample_ids) - train_ids)
        if missing:
            gone = [s for s in missing if s in deleted]
            unknown = [s for s in missing if s not in deleted]
            problems = []
            if gone:
                problems.append(f"sample ids already deleted by another request: {gone[:20]}")
            if unknown:
                problems.append(f"sample ids not in the train split of {production_data(params)}/samples.csv: {unknown[:20]} "
                                "(was the data prepared again with other settings?)")
            ledger.transition(request.id, Status.failed, actor=ACTOR, note="; ".join(problems))
        else:
            claimed.append(request.id)
    if not claimed:
        return []
    mlflow_client = model_registry.client(params)
    candidate = model_registry.pending_candidate(mlflow_client, model_registry.model_name(params))
    if candidate is not None:
        again = [r.id for r in ledger.list(Status.unlearned) if r.model_version == str(candidate.version)]
        if again:
            ledger.transition_many(again, Status.processing, actor=ACTOR,
                                   note=f"unlearned again together with new requests (candidate "
                                        f"v{candidate.version} will be superseded)")
            claimed += again
    return _ledger_order(claimed)


# ------------------------------------------------------------------ 2. plan


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def plan(params: dict, request_ids: list[str]) -> Path:
    """Write work.json for these requests; returns the work folder (named by the work key)."""
    name = model_registry.model_name(params)
    champion = model_registry.get_alias(model_registry.client(params), name, model_registry.CHAMPION)
    if champion is None:
        raise ConfigError(f"registered model '{name}' has no '{model_registry.CHAMPION}' version: run the "
                          "train_target stage, which registers the target as the first champion "
                          "(`dvc repro --force train_target` if DVC would restore it from its cache)")
    method, why = choose_method(params)
    settings = {
        "request_ids": _ledger_order(request_ids),
        "forget_sample_ids": open_ledger(params).forget_sample_ids(request_ids),
        "method": method,
        "base_version": str(champion.version),
        "seed": int(params["ops"]["seed"]),
        "data_hash": model_registry.data_hash(data_files(params)),
        "code_version": model_registry.code_version(),
        "params": {"method": params["methods"][method], "gates": params["ops"]["gates"], "train": params["train"],
                   "evaluate": params["evaluate"], "model": params["model"]},
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    work_dir = Path(params["ops"]["work_dir"]) / key
    if not (work_dir / WORK_FILE).is_file():
        write_json(work_dir / WORK_FILE, {**settings, "work_key": key, "method_reason": why})
    return work_dir


# ------------------------------------------------------------------ 3. unlearn


def _parts(params: dict, forget_ids: list[int]) -> tuple:
    """(prepared data, parts): forget = the requested samples; retain = the rest of the train
    split minus the deletion list (also when `prepare` has not run since the last approval)."""
    data = load_prepared(production_data(params))
    train = data["train"]
    forget = np.isin(train.ids, forget_ids)
    if forget.sum() != len(set(forget_ids)):
        missing = sorted(set(forget_ids) - set(train.ids.tolist()))
        raise DeletionError(f"sample ids not in the prepared train split: {missing[:20]}")
    retain = ~forget & ~np.isin(train.ids, sorted(read_deleted_ids(params["data"]["deleted"])))

    def take(mask: np.ndarray) -> Part:
        index = np.flatnonzero(mask)
        return Part(train.x[index], train.y[index], train.ids[index])

    return data, {"retain": take(retain), "forget": take(forget), "val": data["val"], "test": data["test"]}


def unlearn(params: dict, work_dir: str | Path) -> Path:
    """Unlearn the champion for the work's forget set; writes candidate.pt (once)."""
    work_dir = Path(work_dir)
    out = work_dir / CANDIDATE_FILE
    if out.is_file():
        return out  # an earlier, interrupted run got this far
    work = _read_json(work_dir / WORK_FILE)
    champion = model_registry.load_stack(model_registry.client(params), model_registry.model_name(params), work["base_version"])
    champion.save(work_dir / CHAMPION_FILE)
    data, parts = _parts(params, work["forget_sample_ids"])
    unlearn_data = UnlearnData(parts["retain"], parts["forget"], parts["val"], data.num_classes,
                               bool(params["train"]["augment"]))
    method = methods.get_method(work["method"], params)
    start = time.perf_counter()
    stack = method.unlearn(ModelStack.replicate(champion, [work["seed"]]), unlearn_data, Runtime.from_params(params))
    write_json(work_dir / TIMING_FILE, {"unlearn_seconds": time.perf_counter() - start})
    stack.save(out)  # last: its presence means this step is done
    return out


# ------------------------------------------------------------------ 4. evaluate


def model_metrics(stack: ModelStack, parts: dict, runtime: Runtime, gates: Gates) -> tuple[dict, list[int]]:
    """Model 0's accuracy on retain, forget and test, the loss AUC of forget vs test (the membership
    gate's evidence) and the loss-MIA attack; and which forget samples it gets right (0/1 each)."""
    logits = {s: predict(stack, parts[s].x, runtime)[0].numpy() for s in SPLITS}
    labels = {s: parts[s].y.numpy() for s in SPLITS}
    correct = {s: logits[s].argmax(1) == labels[s] for s in SPLITS}
    metrics = {f"{s}_accuracy": float(correct[s].mean()) for s in SPLITS}
    losses = {s: label_losses(logits[s], labels[s]) for s in ("forget", "test")}
    n_splits = min(gates.mia_splits, len(labels["forget"]), len(labels["test"]))
    mia = (loss_mia(logits["forget"], labels["forget"], logits["test"], labels["test"], n_splits, gates.mia_seed)
           if n_splits >= 2 else {"acc": None, "auc": None})
    auc, auc_se = loss_auc(losses["forget"], losses["test"])
    metrics |= {"loss_auc": auc, "loss_auc_se": auc_se, "mia_auc": mia["auc"], "mia_accuracy": mia["acc"],
                "n_forget": len(labels["forget"]), "n_test": len(labels["test"])}
    return metrics, correct["forget"].astype(int).tolist()


def evaluate(params: dict, work_dir: str | Path) -> Path:
    """Metrics of candidate, champion and (ops.gates.retrain_reference) a retrained model."""
    work_dir = Path(work_dir)
    out = work_dir / EVIDENCE_FILE
    if out.is_file() and "forget_correct" in _read_json(out):  # evidence of an older version lacks the per-sample part: measure again
        return out
    work = _read_json(work_dir / WORK_FILE)
    gates, runtime = Gates.from_params(params), Runtime.from_params(params)
    _, parts = _parts(params, work["forget_sample_ids"])
    models = {"candidate": ModelStack.load(work_dir / CANDIDATE_FILE), "champion": ModelStack.load(work_dir / CHAMPION_FILE)}
    seconds = _read_json(work_dir / TIMING_FILE)
    if gates.retrain_reference:
        cfg = build_dataclass(FitConfig, params["train"]["fit"], "train.fit")
        stream = Stream(parts["retain"].x, parts["retain"].y, cfg.batch_size, bool(params["train"]["augment"]))
        models["retrain"], seconds["retrain_seconds"] = train_from_scratch(
            models["champion"].spec, [int(params["train"]["seed"])], stream, cfg, runtime, desc="retrain reference")
    evaluated = eval_parts(parts, params["evaluate"]["retain_max_samples"], params["evaluate"]["seed"])
    measured = {name: model_metrics(stack, evaluated, runtime, gates) for name, stack in models.items()}
    evidence = {
        "metrics": {name: metrics for name, (metrics, _) in measured.items()},
        "forget_correct": {name: correct for name, (_, correct) in measured.items()},  # the paired forget-accuracy gate
        "n_samples": {s: len(evaluated[s]) for s in SPLITS},
        "seconds": seconds,
    }
    write_json(out, evidence)
    return out


# ------------------------------------------------------------------ 5. register


def judge(evidence: dict, gates: Gates) -> list[dict]:
    """One verdict per gate from `evaluate`'s evidence: status pass | fail, value (the measured
    gap), limit, lower_bound, detail.

    The forget-set gates account for its size: a gap fails only when its one-sided lower bound at
    `gates.confidence` (unlearnops/metrics/gaps.py) is above the limit, so a handful of samples
    cannot fail a good candidate by chance; the verdict shows the bound beside the gap."""
    metrics, correct = evidence["metrics"], evidence["forget_correct"]
    cand, champion, retrain = metrics["candidate"], metrics["champion"], metrics.get("retrain")
    n = cand["n_forget"]
    verdicts = []

    def verdict(gate: str, value: float, limit: float, detail: str, bound: float | None = None) -> None:
        tested = value if bound is None else bound
        verdicts.append({"gate": gate, "status": "pass" if tested <= limit else "fail", "value": value, "limit": limit,
                         "lower_bound": bound, "detail": detail if bound is None else f"{detail}, lower bound {bound:.3f} on {n} samples"})

    # Forgotten data should look like data the model never saw: the retrained model's forget
    # accuracy (paired, on the same samples), or without one the candidate's own test accuracy.
    if retrain:
        gap, se = gaps.paired_accuracy_gap(correct["candidate"], correct["retrain"])
        ref, source = retrain["forget_accuracy"], "retrained"
    else:
        gap, se = gaps.accuracy_gap(cand["forget_accuracy"], n, cand["test_accuracy"], cand["n_test"])
        ref, source = cand["test_accuracy"], "candidate test accuracy"
    verdict("forget_accuracy", gap, gates.max_forget_accuracy_gap,
            f"|forget accuracy {cand['forget_accuracy']:.3f} - {ref:.3f} ({source})|", gaps.lower_bound(gap, se, gates.confidence, n))
    # Membership: how well a sample's loss tells forget from test, against the retrained model's (else chance).
    ref, source = (retrain["loss_auc"], "retrained") if retrain else (0.5, "chance")
    se = float(np.hypot(cand["loss_auc_se"], retrain["loss_auc_se"])) if retrain else cand["loss_auc_se"]
    gap = abs(cand["loss_auc"] - ref)
    verdict("mia", gap, gates.max_mia_auc_gap, f"|loss AUC {cand['loss_auc']:.3f} - {ref:.3f} ({source})|",
            gaps.lower_bound(gap, se, gates.confidence, n))
    # Utility may fall as far as losing the data costs a retrained model, plus the tolerance
    # (hundreds of test and retain samples: the measured drop is the evidence).
    for split, limit in (("test", gates.max_test_accuracy_drop), ("retain", gates.max_retain_accuracy_drop)):
        key = f"{split}_accuracy"
        refs = {"champion": champion[key], **({"retrained": retrain[key]} if retrain else {})}
        source = min(refs, key=refs.get)
        verdict(key, refs[source] - cand[key], limit, f"{source} {refs[source]:.3f} - candidate {cand[key]:.3f}")
    return verdicts


def _version_tags(work: dict, evidence: dict, verdicts: list[dict], parity: dict) -> dict:
    tags = {
        "unlearnops.role": "candidate",
        "review_status": model_registry.PENDING,
        "request_ids": ",".join(work["request_ids"]),
        "n_forget_samples": len(work["forget_sample_ids"]),
        "method": work["method"],
        "method_reason": work["method_reason"],
        "base_version": work["base_version"],
        "work_key": work["work_key"],
        "data_hash": work["data_hash"],
        "code_version": work["code_version"],
        "gates": "passed",
    }
    tags |= {f"gate.{v['gate']}": f"{v['status']}: {v['detail']} (limit {v['limit']:g})" for v in verdicts}
    tags |= {f"onnx.{k}": f"{v:.6g}" for k, v in parity.items()}
    tags |= {k: f"{v:.2f}" for k, v in evidence["seconds"].items()}
    return tags


def evidence_markdown(work: dict, evidence: dict, verdicts: list[dict]) -> str:
    """The review report logged with the run: requests, metrics side by side, gate verdicts."""
    metrics = evidence["metrics"]
    names = list(next(iter(metrics.values())))
    rows = ["| metric | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for k in names:
        rows.append(f"| {k} | " + " | ".join("n/a" if m[k] is None else f"{m[k]:.4f}" for m in metrics.values()) + " |")
    gates = [f"- **{v['gate']}**: {v['status']} ({v['detail']}; limit {v['limit']:g})" for v in verdicts]
    return "\n".join([
        f"# Deletion run {work['work_key']}",
        f"- requests: {', '.join(work['request_ids'])} ({len(work['forget_sample_ids'])} samples)",
        f"- method: {work['method']} ({work['method_reason']}), seed {work['seed']}",
        f"- unlearned from champion v{work['base_version']}; data {work['data_hash']}; code {work['code_version']}",
        f"- evaluated on {evidence['n_samples']}", "", "## Metrics", *rows, "", "## Gates", *gates, "",
    ])


def review_markdown(params: dict, work_dir: str | Path, result: dict) -> str:
    """The evidence of a deletion run as Markdown with links to its MLflow run and version (the
    registered version's description and the Prefect run's artifact)."""
    work_dir = Path(work_dir)
    work, evidence = _read_json(work_dir / WORK_FILE), _read_json(work_dir / EVIDENCE_FILE)
    verdicts = _read_json(work_dir / GATES_FILE)["verdicts"]  # as `register` judged them
    ui, name = str(params["ops"]["ui_url"]).rstrip("/"), model_registry.model_name(params)
    experiment_id = model_registry.client(params).get_run(result["run_id"]).info.experiment_id
    links = [f"- MLflow run: {ui}/#/experiments/{experiment_id}/runs/{result['run_id']}"]
    if result.get("version"):
        links.append(f"- registered: models:/{name}/{result['version']} ({ui}/#/models/{name}/versions/{result['version']}); "
                     "review it with `unlearnops review list`")
    else:
        links.append("- nothing registered: a gate failed (`unlearnops review list --failed`)")
    return evidence_markdown(work, evidence, verdicts) + "\n## Links\n" + "\n".join(links) + "\n"


def restore_champion(params: dict) -> str | None:
    """model_registry.restore_champion for params.yaml's registered model and ledger."""
    return model_registry.restore_champion(model_registry.client(params), open_ledger(params), model_registry.model_name(params))


def _reuse(mlflow_client, name: str, version, work: dict, ledger: Ledger | None = None) -> dict:
    """A version already registered for this exact work: make it the candidate again, unless a
    reviewer rejected it (running the same work again would give the same model)."""
    status = version.tags.get("review_status")
    if status not in (model_registry.PENDING, model_registry.SUPERSEDED):
        raise DeletionError(f"this exact work (same requests, champion, data, code and params) was registered as "
                            f"v{version.version} and {status} by {version.tags.get('reviewed_by', '?')}: "
                            f"{version.tags.get('review_reason', '')}; change ops.method or methods.{work['method']} "
                            "before retrying")
    _mark_superseded(mlflow_client, name, model_registry.pending_candidate(mlflow_client, name), version.version)
    mlflow_client.set_model_version_tag(name, version.version, "review_status", model_registry.PENDING)
    model_registry.set_role(mlflow_client, name, version.version, "candidate")
    model_registry.move_alias(mlflow_client, name, model_registry.CANDIDATE, version.version, ledger,
                              ACTOR, note=f"v{version.version} registered for this exact work before")
    return {"version": str(version.version), "run_id": version.run_id, "method": work["method"], "failed_gates": []}


def _mark_superseded(mlflow_client, name: str, previous, new_version: str) -> None:
    """Tag the candidate that awaited review as superseded by `new_version`."""
    if previous is not None and str(previous.version) != str(new_version):
        mlflow_client.set_model_version_tag(name, previous.version, "review_status", model_registry.SUPERSEDED)
        mlflow_client.set_model_version_tag(name, previous.version, "superseded_by", str(new_version))
        model_registry.set_role(mlflow_client, name, previous.version, "superseded")


def register(params: dict, work_dir: str | Path) -> dict:
    """Gate the candidate and, if no gate fails, register it with alias `candidate`.

    Returns {"version": str | None, "run_id", "failed_gates": [...]}.
    """
    work_dir = Path(work_dir)
    work, evidence = _read_json(work_dir / WORK_FILE), _read_json(work_dir / EVIDENCE_FILE)
    verdicts = judge(evidence, Gates.from_params(params))
    write_json(work_dir / GATES_FILE, {"verdicts": verdicts})  # the one judgement the run's report shows
    failed = [f"{v['gate']}: {v['detail']} > {v['limit']:g}" for v in verdicts if v["status"] == "fail"]
    name, mlflow_client = model_registry.model_name(params), model_registry.client(params)
    existing = model_registry.versions(mlflow_client, name, work_key=work["work_key"])
    if existing:  # the same work key means the same evidence, so its gates passed too
        return _reuse(mlflow_client, name, existing[0], work, open_ledger(params))

    mlflow = tracking.configure(params)
    tags = {"unlearnops.stage": "deletion", "work_key": work["work_key"], "gates": "failed" if failed else "passed"}
    with mlflow.start_run(run_name=f"deletion-{work['work_key'][:8]}", tags=tags) as run:
        mlflow.log_params({"method": work["method"], "base_version": work["base_version"], "seed": work["seed"],
                           "n_requests": len(work["request_ids"]), "n_forget_samples": len(work["forget_sample_ids"])})
        mlflow.log_metrics({k: v for k, v in tracking.flatten(evidence["metrics"]).items() if v is not None and math.isfinite(v)})
        mlflow.log_dict({"work": work, "evidence": evidence, "gates": verdicts}, "review/evidence.json")
        mlflow.log_text(evidence_markdown(work, evidence, verdicts), "review/report.md")
        result = {"version": None, "run_id": run.info.run_id, "method": work["method"], "failed_gates": failed}
        if failed:  # `review list --failed` shows these
            mlflow.set_tags({"request_ids": ",".join(work["request_ids"]), "method": work["method"],
                             "failed_gates": "; ".join(failed)[:4000]})
            return result
        _, parts = _parts(params, work["forget_sample_ids"])
        stack = ModelStack.load(work_dir / CANDIDATE_FILE)
        info, parity = model_registry.log_model_files(mlflow, stack, parts["test"].x, params)
        previous = model_registry.pending_candidate(mlflow_client, name)
        version = model_registry.register(mlflow_client, name, info, run.info.run_id,
                                    _version_tags(work, evidence, verdicts, parity), model_registry.CANDIDATE,
                                    open_ledger(params), ACTOR)
        mlflow_client.update_model_version(name, version.version, description=evidence_markdown(work, evidence, verdicts))
        _mark_superseded(mlflow_client, name, previous, version.version)
    return {**result, "version": str(version.version)}


# ------------------------------------------------------------------ 6. settle


def settle(params: dict, request_ids: list[str], result: dict) -> dict:
    """Record the run's outcome on its requests (only those still processing)."""
    if result["version"] is None:
        return fail(params, request_ids, "gates failed: " + "; ".join(result["failed_gates"]), "GatesFailed")
    ledger = open_ledger(params)
    done = [r for r in request_ids if ledger.get(r).status is Status.processing]
    if done:  # one transaction: all of the run's requests, or none
        ledger.transition_many(done, Status.unlearned, actor=ACTOR, model_version=result["version"],
                               note=f"unlearned into candidate v{result['version']} with {result['method']}",
                               extra={"mlflow_run_id": result["run_id"]})
    return {"version": result["version"], "unlearned": done, "failed": []}


def fail(params: dict, request_ids: list[str] | None, reason: str, error_class: str = "DeletionError") -> dict:
    """Settle every request the run holds (status processing: the lease makes them this run's)
    in one transaction: `failed` with the reason and the error's class, or back to `unlearned`
    where the pending candidate still covers them. `request_ids` is kept for the caller's
    report; the ledger decides what is held, so requests claimed before a crash count too."""
    ledger = open_ledger(params)
    try:
        candidate = model_registry.pending_candidate(model_registry.client(params), model_registry.model_name(params))
    except Exception:  # the registry may be what failed: then no request stays with a candidate
        candidate = None
    failed, kept = ledger.fail_processing(reason, error_class, actor=ACTOR,
                                          candidate_version=None if candidate is None else str(candidate.version))
    return {"version": None, "unlearned": kept, "failed": failed, "reason": f"{reason} [{error_class}]"}
