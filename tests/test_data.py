"""Splits, forget sets and the real on-disk loaders (CIFAR-10 batches, image folder)."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from unlearnops import data as data_lib
from unlearnops.config import ConfigError


def prepared_table(params, out) -> pd.DataFrame:
    data_lib.prepare(params, out)
    return pd.read_csv(out / "samples.csv")


def test_split_ids_disjoint_cover_everything_and_deterministic(tiny_params, tmp_path):
    first = prepared_table(tiny_params, tmp_path / "a")
    second = prepared_table(tiny_params, tmp_path / "b")
    pd.testing.assert_frame_equal(first, second)
    assert first["sample_id"].is_unique
    assert set(first["split"]) == {"train", "val", "test"}
    assert len(first) == tiny_params["data"]["synthetic"]["n_samples"]
    # the forget set lies inside train, and retain = train minus forget
    assert (first.loc[first["forget"], "split"] == "train").all()
    n_train = (first["split"] == "train").sum()
    assert first["forget"].sum() == round(n_train * tiny_params["forget"]["fraction"])


def test_other_split_seed_changes_split(tiny_params, tmp_path):
    first = prepared_table(tiny_params, tmp_path / "a")
    tiny_params["data"]["split_seed"] = 7
    second = prepared_table(tiny_params, tmp_path / "b")
    assert (first["split"] != second["split"]).any()


def test_forget_users_takes_every_train_sample_of_chosen_users(tiny_params, tmp_path):
    tiny_params["forget"].update(mode="users", n_users=3)
    table = prepared_table(tiny_params, tmp_path)
    users = table.loc[table["forget"], "user_id"].unique()
    assert len(users) == 3
    train_of_users = table[(table["split"] == "train") & table["user_id"].isin(users)]
    assert train_of_users["forget"].all()
    # pseudo-users: deterministic groups of samples_per_pseudo_user
    assert table["user_id"].value_counts().max() == tiny_params["data"]["samples_per_pseudo_user"]


def test_forget_class_is_one_whole_class(tiny_params, tmp_path):
    tiny_params["forget"].update(mode="class", **{"class": 2})
    table = prepared_table(tiny_params, tmp_path)
    train = table[table["split"] == "train"]
    assert (train["forget"] == (train["label"] == 2)).all()


@pytest.mark.parametrize(
    "section, change, message",
    [
        ("forget", {"fraction": 1.5}, "forget.fraction must be in (0, 1), got 1.5"),
        ("forget", {"fraction": 0.0}, "forget.fraction must be in (0, 1)"),
        ("forget", {"mode": "users", "n_users": 10_000}, "forget.n_users is 10000"),
        ("forget", {"mode": "everything"}, "unknown forget mode 'everything'; allowed: random, users, class"),
        ("forget", {"mode": "class", "class": 9}, "forget.class is 9; allowed: 0..3"),
        ("data", {"name": "imagenet"}, "unknown dataset 'imagenet'; allowed: digits, cifar10, image_folder, synthetic"),
        ("data", {"val_fraction": 0.6, "test_fraction": 0.5}, "must be < 1"),
    ],
)
def test_bad_data_params_are_named(tiny_params, tmp_path, section, change, message):
    tiny_params[section].update(change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        data_lib.prepare(tiny_params, tmp_path)
    assert not (tmp_path / "samples.csv").exists()


def test_deleted_samples_never_reach_prepared_data_and_others_keep_their_split(tiny_params, tmp_path):
    before = prepared_table(tiny_params, tmp_path / "before")
    deleted = before[before["split"] == "train"]["sample_id"].head(7).tolist()
    pd.DataFrame({"sample_id": deleted, "user_id": 0, "request_id": "req-1", "approved_at": "now"}).to_csv(tiny_params["data"]["deleted"], index=False)
    after = prepared_table(tiny_params, tmp_path / "after")
    assert not after["sample_id"].isin(deleted).any()
    assert len(after) == len(before) - 7
    merged = after.merge(before, on="sample_id", suffixes=("", "_before"))
    assert (merged["split"] == merged["split_before"]).all()
    blob = torch.load(tmp_path / "after" / "images.pt", weights_only=True)
    assert not np.isin(blob["sample_ids"].numpy(), deleted).any()


def test_load_prepared_parts_match_table(tiny_params, tmp_path):
    table = prepared_table(tiny_params, tmp_path)
    data = data_lib.load_prepared(tmp_path)
    for name, mask in {
        "retain": (table["split"] == "train") & ~table["forget"],
        "forget": table["forget"],
        "test": table["split"] == "test",
    }.items():
        assert list(data[name].ids) == table.loc[mask, "sample_id"].tolist()
        assert data[name].y.tolist() == table.loc[mask, "label"].tolist()
    # normalised with train statistics
    assert abs(float(data["train"].x.mean())) < 1e-4


def write_cifar_batches(root, n_per_batch=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8), b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar10_loader_reads_torchvision_format(tmp_path):
    folder = write_cifar_batches(tmp_path)
    source = data_lib.load_cifar10_source({"root": str(tmp_path)})
    assert source.images.shape == (36, 3, 32, 32) and source.images.dtype == torch.uint8
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    assert torch.equal(source.images[0].flatten(), torch.from_numpy(first[b"data"][0]))
    assert source.labels[:6].tolist() == [int(v) for v in first[b"labels"]]


def test_cifar10_missing_directory_names_path_and_never_downloads(tmp_path):
    with pytest.raises(ConfigError, match=r"CIFAR-10 not found at .*cifar-10-batches-py.*never downloads"):
        data_lib.load_cifar10_source({"root": str(tmp_path / "nowhere")})


def test_cifar10_loader_refuses_pickled_code(tmp_path):
    folder = write_cifar_batches(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"evil": print}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        data_lib.load_cifar10_source({"root": str(tmp_path)})


def write_image_folder(root, n_users=4, per_user=3):
    rows = []
    for user in range(n_users):
        for k in range(per_user):
            path = f"imgs/u{user}_{k}.png"
            (root / "imgs").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10, 12), (20 * user + k,) * 3).save(root / path)
            rows.append({"path": path, "label": user % 2, "user_id": 100 + user})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return rows


def test_image_folder_loader_resizes_and_keeps_user_ids(tmp_path):
    rows = write_image_folder(tmp_path)
    cfg = {"root": str(tmp_path), "csv": "labels.csv", "image_size": 8, "num_classes": None}
    source = data_lib.load_image_folder_source(cfg)
    assert source.images.shape == (12, 3, 8, 8)
    assert source.user_ids.tolist() == [r["user_id"] for r in rows]
    assert source.num_classes == 2
    assert int(source.images[4].float().mean().round()) == 20 * 1 + 1  # u1_1 is a flat image of value 21


def test_image_folder_users_forget_mode_end_to_end(tiny_params, tmp_path):
    write_image_folder(tmp_path / "faces", n_users=6, per_user=4)
    tiny_params["data"].update(name="image_folder", root=str(tmp_path / "faces"), csv="labels.csv", image_size=8, val_fraction=0.0, test_fraction=0.25)
    tiny_params["forget"].update(mode="users", n_users=2)
    table = prepared_table(tiny_params, tmp_path / "out")
    forgotten = table.loc[table["forget"], "user_id"].unique()
    assert len(forgotten) == 2 and set(forgotten) <= set(range(100, 106))


def test_image_folder_errors_name_the_problem(tmp_path):
    write_image_folder(tmp_path)
    cfg = {"root": str(tmp_path), "csv": "labels.csv", "image_size": 8, "num_classes": None}
    (tmp_path / "imgs" / "u0_0.png").unlink()
    with pytest.raises(ConfigError, match=r"image listed in .*labels.csv not found: .*u0_0.png"):
        data_lib.load_image_folder_source(cfg)
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ConfigError, match=r"needs columns \['label', 'path', 'user_id'\]"):
        data_lib.load_image_folder_source({**cfg, "csv": "bad.csv"})
