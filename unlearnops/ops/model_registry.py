"""The MLflow model registry: the model in production, candidates for review, the decision.

One registered model (params.yaml `ops.model_name`) with two aliases:
- `champion`: the model in production. The first is the target model, registered by the
  train_target stage when the registered model has no champion yet.
- `candidate`: the newest unlearned version awaiting review (flows/deletion.py registers it).

Every version is an MLflow ONNX model (what a server loads) carrying the ModelStack file as
an extra file (`extra_files/models.pt`: the weights further unlearning starts from, read with
torch.load(weights_only=True); an MLflow pytorch model is a pickle and is never loaded).
Its tags carry the evidence a reviewer needs: request ids, method, metrics against the
champion and a retrained reference, gate verdicts, ONNX parity, data hash, code version.

Review: `approve` moves `champion` to the version, records reviewer, time and reason as
version tags, marks its deletion requests `approved` and appends their samples to the
deletion list, so the next `prepare` drops them. `reject` records why and sends the requests
to `failed` (the request stays valid; the model did not do): an operator changes the method or
its hyperparameters and runs `unlearnops request retry`. `reject_requests=True` rejects the
requests themselves instead (for a request that should never have been accepted).
"""
from __future__ import annotations

import hashlib
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from unlearnops import tracking
from unlearnops.ops.ledger import Ledger, Status, apply_approved

if TYPE_CHECKING:  # torch and ONNX load in the functions that use them: `review list` needs neither
    import torch

    from unlearnops.stack import ModelStack

CHAMPION = "champion"
CANDIDATE = "candidate"
STACK_PATH = "extra_files/models.pt"  # where mlflow.onnx.log_model puts extra_files
ONNX_REQUIREMENTS = ["onnx==1.23.2", "onnxruntime==1.31.1"]
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# Values of the `review_status` tag of a candidate.
PENDING, APPROVED, REJECTED, SUPERSEDED = "pending", "approved", "rejected", "superseded"


class RegistryError(ValueError):
    """A review action that cannot be carried out (nothing was changed)."""


def client(params: dict):
    """An MlflowClient on the tracking store of params (MLFLOW_TRACKING_URI wins)."""
    tracking.configure(params)
    from mlflow import MlflowClient

    return MlflowClient()


def model_name(params: dict) -> str:
    return str(params["ops"]["model_name"])


# ------------------------------------------------------------------ provenance


def data_hash(paths: list[str | Path]) -> str:
    """sha256 over the files that exist among `paths` (name and bytes), first 16 hex digits."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        if path.is_file():
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def code_version() -> str:
    """The git commit of the unlearnops checkout, with '-dirty' if it has local changes."""
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


# ------------------------------------------------------------------ versions


def get_alias(mlflow_client, name: str, alias: str):
    """The version holding `alias`, or None (also when the registered model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def get_version(mlflow_client, name: str, version: int | str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"registered model '{name}' has no version {version!r}") from None


def versions(mlflow_client, name: str, **tags: str) -> list:
    """Versions of `name` whose tags have these values, newest first."""
    query = " and ".join([f"name='{name}'"] + [f"tags.`{k}`='{v}'" for k, v in tags.items()])
    numbers = sorted((int(v.version) for v in mlflow_client.search_model_versions(query)), reverse=True)
    return [get_version(mlflow_client, name, n) for n in numbers]  # search results carry no aliases


def load_stack(mlflow_client, name: str, version: int | str) -> ModelStack:
    """The weights of a registered version, as a ModelStack of one model."""
    import mlflow

    from unlearnops.stack import ModelStack

    get_version(mlflow_client, name, version)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/{STACK_PATH}", dst_path=tmp)
        return ModelStack.load(path)


def log_model_files(mlflow, stack: ModelStack, test_x: torch.Tensor, params: dict):
    """Inside an active run: export model 0 of `stack` to ONNX, check parity on `test_x`, log
    the ONNX model with the stack file as an extra file. Returns (model info, parity)."""
    import onnx
    import torch
    from mlflow.models import infer_signature

    from unlearnops.ops.export import OnnxConfig, export_checked

    cfg = OnnxConfig.from_params(params)
    example = test_x[:2]
    with torch.no_grad():  # the signature: an image batch in, one logit per class out
        signature = infer_signature(example.numpy(), stack.module(0).eval()(example).float().numpy())
    with tempfile.TemporaryDirectory() as tmp:
        stack_path = Path(tmp) / "models.pt"
        stack.select([0]).save(stack_path)
        result = export_checked(stack.module(0), test_x, Path(tmp) / "model.onnx", cfg)
        mlflow.log_metrics({f"onnx.{k}": v for k, v in result.items()})
        info = mlflow.onnx.log_model(onnx.load(str(Path(tmp) / "model.onnx")), name="onnx",
                                     extra_files=[str(stack_path)], pip_requirements=ONNX_REQUIREMENTS,
                                     input_example=example.numpy(), signature=signature)
    return info, result


def register(mlflow_client, name: str, model_info, run_id: str, tags: dict, alias: str):
    """A new version of `name` from a logged model, with tags, holding `alias`."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = mlflow_client.create_model_version(name, source=model_info.model_uri, run_id=run_id,
                                                 tags={k: str(v) for k, v in tags.items()},
                                                 model_id=model_info.model_id)
    mlflow_client.set_registered_model_alias(name, alias, version.version)
    return get_version(mlflow_client, name, version.version)


def register_first_champion(mlflow, run, params: dict, stack: ModelStack, test_x: torch.Tensor,
                            metrics: dict, data_files: list[Path]):
    """In the target's run: register it as `champion` if the registered model has none yet."""
    mlflow_client = client(params)
    name = model_name(params)
    current = get_alias(mlflow_client, name, CHAMPION)
    if current is not None:
        print(f"registry: '{name}' already has champion v{current.version}; the target is not registered")
        return None
    info, parity = log_model_files(mlflow, stack, test_x, params)
    tags = {"unlearnops.role": "target", "code_version": code_version(), "data_hash": data_hash(data_files),
            **{f"metric.target.{k}": f"{v:.4f}" for k, v in metrics.items()},
            **{f"onnx.{k}": f"{v:.6g}" for k, v in parity.items()}}
    version = register(mlflow_client, name, info, run.info.run_id, tags, CHAMPION)
    print(f"registry: registered the target as '{name}' v{version.version} (alias {CHAMPION})")
    return version


def pending_candidate(mlflow_client, name: str):
    """The version holding `candidate` if it still awaits review, else None."""
    version = get_alias(mlflow_client, name, CANDIDATE)
    return version if version is not None and version.tags.get("review_status") == PENDING else None


def candidates(mlflow_client, name: str, include_decided: bool = False) -> list:
    """Unlearned candidate versions, newest first: those awaiting review, or all."""
    found = versions(mlflow_client, name, **{"unlearnops.role": "candidate"})
    return found if include_decided else [v for v in found if v.tags.get("review_status") == PENDING]


def request_ids_of(version) -> list[str]:
    return [r for r in version.tags.get("request_ids", "").split(",") if r]


# ------------------------------------------------------------------ review


def _reviewable(mlflow_client, name: str, number: int | str):
    """A candidate a reviewer may decide on; RegistryError naming why not otherwise."""
    version = get_version(mlflow_client, name, number)
    tags = version.tags
    if tags.get("unlearnops.role") != "candidate":
        raise RegistryError(f"v{version.version} of '{name}' is not an unlearned candidate "
                            f"(role: {tags.get('unlearnops.role', 'none')})")
    if tags.get("gates") != "passed":
        failed = [f"{k}: {v}" for k, v in sorted(tags.items()) if k.startswith("gate.") and v.startswith("fail")]
        raise RegistryError(f"v{version.version}: its gates did not pass ({'; '.join(failed) or 'no gate verdicts'}); "
                            "it cannot be approved")
    status = tags.get("review_status")
    if status != PENDING:
        raise RegistryError(f"v{version.version} is not awaiting review (review_status: {status})")
    return version


def _now() -> datetime:
    return datetime.now(timezone.utc)


def approve(mlflow_client, ledger: Ledger, params: dict, number: int | str, reviewer: str, reason: str | None = None):
    """Make candidate `number` the champion; its requests become `approved` and deleted.

    Each step can be repeated, so an approval interrupted half-way is finished by running it
    again: requests already approved, samples already listed and aliases already moved are
    left as they are; the version is tagged `approved` last.
    """
    name = model_name(params)
    version = _reviewable(mlflow_client, name, number)
    champion = get_alias(mlflow_client, name, CHAMPION)
    resumed = champion is not None and champion.version == version.version
    if not resumed:
        if CANDIDATE not in version.aliases:
            raise RegistryError(f"v{version.version} no longer holds the '{CANDIDATE}' alias")
        base = version.tags.get("base_version")
        if champion is None or base != str(champion.version):
            raise RegistryError(f"v{version.version} was unlearned from v{base}, but the champion is now "
                                f"v{champion.version if champion else 'none'}; it is out of date")
    request_ids = request_ids_of(version)
    requests = [ledger.get(r) for r in request_ids]
    not_ready = [f"{r.id} ({r.status}, model version {r.model_version})" for r in requests
                 if r.model_version != str(version.version) or r.status not in (Status.unlearned, Status.approved)]
    if not_ready:
        raise RegistryError(f"v{version.version}: its requests are not all unlearned into it: {', '.join(not_ready)}")
    now = _now()
    note = f"approved v{version.version}" + (f": {reason}" if reason else "")
    for r in requests:
        if r.status is Status.unlearned:
            ledger.transition(r.id, Status.approved, actor=reviewer, note=note)
    apply_approved(ledger, params["data"]["deleted"], request_ids, now)
    mlflow_client.set_registered_model_alias(name, CHAMPION, version.version)
    for key, value in {"reviewed_by": reviewer, "reviewed_at": now.isoformat(timespec="seconds"),
                       "review_reason": reason or "", "review_status": APPROVED}.items():
        mlflow_client.set_model_version_tag(name, version.version, key, value)
    if CANDIDATE in version.aliases:
        mlflow_client.delete_registered_model_alias(name, CANDIDATE)
    return get_version(mlflow_client, name, version.version)


def reject(mlflow_client, ledger: Ledger, params: dict, number: int | str, reviewer: str, reason: str,
           reject_requests: bool = False):
    """Turn candidate `number` down; its requests go to `failed` (or `rejected`), with the reason."""
    if not reason or not reason.strip():
        raise RegistryError("a rejection needs a reason")
    name = model_name(params)
    version = _reviewable(mlflow_client, name, number)
    now = _now()
    note = f"candidate v{version.version} rejected by {reviewer}: {reason}"
    for request_id in request_ids_of(version):
        request = ledger.get(request_id)
        if request.status is not Status.unlearned or request.model_version != str(version.version):
            continue  # already moved on (an earlier, interrupted rejection)
        if reject_requests:
            ledger.transition(request_id, Status.rejected, actor=reviewer, note=note)
        else:
            # unlearned -> failed is not a ledger transition; processing -> failed is.
            ledger.transition(request_id, Status.processing, actor=reviewer, note=note)
            ledger.transition(request_id, Status.failed, actor=reviewer,
                              note=f"{note}; change ops.method or its hyperparameters, then "
                                   "`unlearnops request retry`")
    for key, value in {"reviewed_by": reviewer, "reviewed_at": now.isoformat(timespec="seconds"),
                       "review_reason": reason, "review_status": REJECTED}.items():
        mlflow_client.set_model_version_tag(name, version.version, key, value)
    if CANDIDATE in version.aliases:
        mlflow_client.delete_registered_model_alias(name, CANDIDATE)
    return get_version(mlflow_client, name, version.version)
