"""Retain-set condensation before unlearning: fewer retain images, faster retain-based methods.

Blend (arXiv 2507.09786; follows algebraicdianuj/DC_U `dc_methods/dc_blend_v2.py` and the script
of DC_U that calls `create_sub_classes` and then `blend_DC`): per class, k-means in a feature space splits the retain images
into `ipc` clusters. A cluster with no forget image is condensed to ONE synthetic image, a
weighted average of its images whose weights are learned so that the blended image's embedding
matches the cluster's mean embedding. A cluster holding a forget image keeps its retain images
unchanged (the region near the forget set is where unlearning needs them). Forget images are
clustered with retain images (that is how we know which clusters they fall in) and never appear
in the output.

The feature space (`condense.blend.feature_net`): `random`, as the authors, the embedding of a
randomly initialised network (`get_model(..., load=False)` for both the k-means and
`blend_DC`), or `target`, the original model's penultimate features. Deviations: the random
network has the model's own architecture (the authors use their small ConvNet `cnn_s`),
initialised from `condense.blend.seed`; the blending weights are a softmax of logits (the authors
normalise raw weights by their sum), which keeps them positive, so the authors' step count (20)
and lr (a cubic in ipc) do not carry over: `iterations` and `lr` are this parametrisation's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unlearnops.config import ConfigError, build_dataclass, choose
from unlearnops.data import Part
from unlearnops.nets import without_head
from unlearnops.stack import ModelStack
from unlearnops.training import Runtime, penultimate_features

CONDENSERS = ("blend",)
FEATURE_NETS = ("random", "target")
BLENDED_ID = -1  # sample id of a synthetic (blended) image


@dataclass
class BlendConfig:
    """params.yaml `condense.blend`."""

    ipc: int  # clusters per class
    feature_net: str  # random (a randomly initialised network, as the authors) | target (the original model)
    seed: int  # k-means initialisation and the random network's
    kmeans_n_init: int
    iterations: int  # SGD steps on the blending weights
    lr: float
    momentum: float


@dataclass
class Blended:
    retain: Part  # the condensed retain set: kept images first, then blended ones (ids -1)
    n_kept: int  # retain images kept as they are (their cluster holds a forget image)
    n_blended: int  # synthetic images, one per cluster without forget images
    match_loss: list[float]  # embedding-matching loss before each SGD step and after the last (the first: plain mean images)


def condense(name: str, params: dict, retain: Part, forget: Part, original: ModelStack, runtime: Runtime) -> Blended:
    """The condenser `name` configured from params.yaml `condense.<name>`."""
    choose(name, CONDENSERS, "condenser")
    cfg = build_dataclass(BlendConfig, params.get("condense", {}).get(name), f"condense.{name}")
    return blend(retain, forget, original, cfg, runtime)


def blend(retain: Part, forget: Part, original: ModelStack, cfg: BlendConfig, runtime: Runtime) -> Blended:
    """Condense `retain` with Blend, in the embedding `cfg.feature_net` names (model 0 of `original`
    for `target`, a network of its architecture initialised from `cfg.seed` for `random`)."""
    from sklearn.cluster import KMeans  # imported here: every unlearn stage imports this module

    if cfg.ipc < 1:
        raise ConfigError(f"condense.blend.ipc is {cfg.ipc}: each class needs at least 1 cluster, or the class would be left empty")
    choose(cfg.feature_net, FEATURE_NETS, "condense.blend.feature_net")
    model = original.select([0]) if cfg.feature_net == "target" else ModelStack.fresh(original.spec, [cfg.seed])
    x = torch.cat([retain.x, forget.x])
    y = torch.cat([retain.y, forget.y]).numpy()
    is_forget = np.arange(len(x)) >= len(retain)
    features = penultimate_features(model, x, runtime)[0]

    kept, members, cluster_of, cluster_labels = [], [], [], []  # retain rows kept / blended, each blended row's cluster
    for label in np.unique(retain.y.numpy()):
        rows = np.flatnonzero(y == label)
        k = min(cfg.ipc, len(rows))
        assignment = KMeans(n_clusters=k, random_state=cfg.seed, n_init=cfg.kmeans_n_init).fit_predict(features[rows].double().numpy())
        for cluster in range(k):
            in_cluster = rows[assignment == cluster]
            retain_rows = in_cluster[~is_forget[in_cluster]]
            if is_forget[in_cluster].any():
                kept.extend(retain_rows)
            elif len(retain_rows):
                cluster_of.extend([len(cluster_labels)] * len(retain_rows))
                members.extend(retain_rows)
                cluster_labels.append(label)

    n_clusters = len(cluster_labels)
    kept_index, member_index = torch.as_tensor(kept, dtype=torch.long), torch.as_tensor(members, dtype=torch.long)
    cluster_index = torch.as_tensor(cluster_of, dtype=torch.long)
    images, losses = _blend_clusters(retain.x[member_index], features[member_index], cluster_index, n_clusters, model, cfg, runtime)
    labels = torch.as_tensor(np.asarray(cluster_labels, dtype=np.int64), dtype=retain.y.dtype)
    condensed = Part(
        torch.cat([retain.x[kept_index], images]),
        torch.cat([retain.y[kept_index], labels]),
        np.concatenate([np.asarray(retain.ids)[kept_index.numpy()], np.full(n_clusters, BLENDED_ID, dtype=np.asarray(retain.ids).dtype)]),
    )
    return Blended(condensed, len(kept), n_clusters, losses)


def _blend_clusters(images, features, cluster, n_clusters, model, cfg, runtime):
    """One image per cluster: softmax(logits)-weighted average of its images (weights start at
    1/n), logits fitted by SGD so the blended image's embedding matches the cluster's mean
    embedding. All clusters are optimised together; their losses are summed, so each cluster's
    weights see the gradient of its own MSE alone."""
    device = runtime.device
    body, _ = without_head(model.module(0))
    body = body.to(device).requires_grad_(False)
    images, features, cluster = images.to(device), features.to(device), cluster.to(device)
    sizes = torch.bincount(cluster, minlength=n_clusters).to(images.dtype)
    target = torch.zeros(n_clusters, features.shape[1], device=device).index_add_(0, cluster, features) / sizes[:, None]
    logits = torch.zeros(len(images), device=device, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=cfg.lr, momentum=cfg.momentum)
    flat = images.flatten(1)

    def blended() -> torch.Tensor:
        # A softmax within each cluster (shifted by the cluster's max logit, so it never overflows).
        top = torch.zeros(n_clusters, device=device).scatter_reduce(0, cluster, logits.detach(), "amax", include_self=False)
        weights = torch.exp(logits - top[cluster])
        weights = weights / torch.zeros(n_clusters, device=device).index_add(0, cluster, weights)[cluster]
        mixed = torch.zeros(n_clusters, flat.shape[1], device=device).index_add(0, cluster, weights[:, None] * flat)
        return mixed.view(n_clusters, *images.shape[1:])

    def matching_loss(mixed: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(body(mixed), target, reduction="none").mean(1).sum()

    losses = []
    for _ in range(cfg.iterations):
        loss = matching_loss(blended())
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        mixed = blended()
        losses.append(float(matching_loss(mixed)))
    return mixed.cpu(), losses
