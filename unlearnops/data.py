"""Datasets, the train/val/test split and the forget set, all spoken of by sample id.

`split()` turns a source (digits, CIFAR-10 on disk, an image folder, synthetic) into a folder
with `images.pt` (uint8 images, labels, ids) and `samples.csv` with one row per sample:
sample_id, user_id, label, split, forget; `choose_forget()` writes a setting's own samples.csv
with its forget set; `prepare()` does both into one folder. Deletion requests, DVC stages and tests all
refer to the same sample and user ids. Samples listed in the deletion list are dropped before
anything is written, so approved deletions never reach a later stage.
"""
from __future__ import annotations

import csv
import io
import re
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from unlearnops.config import ConfigError, choose
from unlearnops.files import torch_save, write_csv

SPLITS = ("train", "val", "test")
FORGET_MODES = ("random", "users", "class")


@dataclass
class Source:
    """A whole data set in memory: uint8 images [n, C, H, W], labels, stable ids."""

    images: torch.Tensor
    labels: torch.Tensor
    sample_ids: np.ndarray
    user_ids: np.ndarray | None  # None: the source has no notion of users
    num_classes: int


# ---------------------------------------------------------------- sources


def load_digits_source(cfg: dict) -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; scale to the uint8 range every other source uses.
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[:, None]
    return Source(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(digits.target.astype(np.int64)),
        sample_ids=np.arange(len(images), dtype=np.int64),
        user_ids=None,
        num_classes=10,
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; allow nothing but numpy array rebuilding."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    data = batch[b"data"] if b"data" in batch else batch["data"]
    labels = batch[b"labels"] if b"labels" in batch else batch["labels"]
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10_source(cfg: dict) -> Source:
    folder = Path(cfg["root"]) / "cifar-10-batches-py"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"CIFAR-10 not found at {folder} (missing {', '.join(missing)}). Download "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract "
            f"it into {cfg['root']}, or set data.root; unlearnops never downloads data itself."
        )
    parts = [_read_cifar_batch(folder / name) for name in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return Source(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        sample_ids=np.arange(len(images), dtype=np.int64),  # official train 0..49999, test after
        user_ids=None,
        num_classes=10,
    )


_ID = re.compile(r"[0-9]+", re.ASCII)


def _row_int(cell: object, column: str, row: int, where: Path, minimum: int = 0) -> int:
    """The integer in a CSV cell (ASCII digits), or a ConfigError naming the row."""
    text = str(cell).strip()
    if not _ID.fullmatch(text) or int(text) < minimum:
        what = "empty" if text == "" else f"{text!r} is not an integer >= {minimum}"
        raise ConfigError(f"image_folder: {where} line {row}: {column} {what}")
    return int(text)


def confined(root: Path, rel: str, where: str) -> Path:
    """`rel` resolved inside `root`: no absolute path, no `..`, no symlink leading out."""
    text = str(rel).strip()
    if text == "" or text.lower() == "nan":
        raise ConfigError(f"{where}: empty path")
    candidate = Path(text)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ConfigError(f"{where}: path {text!r} must be relative to {root} without '..'")
    base = root.resolve()
    resolved = (base / candidate).resolve()
    if not resolved.is_relative_to(base):
        raise ConfigError(f"{where}: path {text!r} leads outside {root} (symlink to {resolved})")
    return resolved


def load_image_folder_source(cfg: dict) -> Source:
    """Images listed in a CSV of path,label,user_id (paths relative to the CSV's folder, which
    they may not leave: no absolute paths, no `..`, no symlinks out of data.root)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(cfg["root"])
    csv_path = confined(root, cfg["csv"], "image_folder: data.csv") if root.is_dir() else root / cfg["csv"]
    if not csv_path.is_file():
        raise ConfigError(f"image_folder: CSV not found at {csv_path} (set data.root and data.csv)")
    try:
        # Strings, so an empty or non-integer cell is reported rather than coerced.
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ConfigError(f"image_folder: {csv_path} cannot be read: {' '.join(str(err).split())}") from None
    needed = {"path", "label", "user_id"}
    if not needed <= set(table.columns):
        raise ConfigError(f"image_folder: {csv_path} needs columns {sorted(needed)}, has {list(table.columns)}")
    if table.empty:
        raise ConfigError(f"image_folder: {csv_path} lists no images")
    size = int(cfg["image_size"])
    images, labels, users = [], [], []
    for row, (rel, label, user) in enumerate(zip(table["path"], table["label"], table["user_id"]), start=2):
        where = f"image_folder: {csv_path} line {row}"
        labels.append(_row_int(label, "label", row, csv_path))
        users.append(_row_int(user, "user_id", row, csv_path))
        path = confined(csv_path.parent, rel, where)
        if not path.is_relative_to(root.resolve()):
            raise ConfigError(f"{where}: path {rel!r} leads outside data.root {root}")
        if not path.is_file():
            raise ConfigError(f"{where}: image listed in {csv_path} not found: {path}")
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ConfigError(f"{where}: unreadable image {rel!r}: {type(err).__name__}") from None
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
    labels_array = np.asarray(labels, dtype=np.int64)
    num_classes = int(cfg.get("num_classes") or labels_array.max() + 1)
    if labels_array.max() >= num_classes:
        raise ConfigError(f"image_folder: {csv_path}: label {labels_array.max()} >= data.num_classes {num_classes}")
    return Source(
        images=torch.stack(images),
        labels=torch.from_numpy(labels_array),
        sample_ids=np.arange(len(table), dtype=np.int64),  # row number in the CSV
        user_ids=np.asarray(users, dtype=np.int64),
        num_classes=num_classes,
    )


def load_synthetic_source(cfg: dict) -> Source:
    """Class-dependent random patterns plus noise: a quick data set for tests."""
    syn = cfg["synthetic"]
    gen = torch.Generator().manual_seed(int(syn["seed"]))
    n, k, size, ch = int(syn["n_samples"]), int(syn["n_classes"]), int(syn["image_size"]), int(syn["channels"])
    prototypes = torch.rand(k, ch, size, size, generator=gen)
    labels = torch.arange(n) % k
    noise = torch.randn(n, ch, size, size, generator=gen) * float(syn["noise"])
    images = ((prototypes[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return Source(images, labels, np.arange(n, dtype=np.int64), None, k)


SOURCES = {
    "digits": load_digits_source,
    "cifar10": load_cifar10_source,
    "image_folder": load_image_folder_source,
    "synthetic": load_synthetic_source,
}


def load_source(cfg: dict) -> Source:
    return SOURCES[choose(cfg["name"], SOURCES, "dataset")](cfg)


# ---------------------------------------------------------------- split and forget set


def read_deleted_ids(path: str | Path) -> set[int]:
    """Sample ids in the deletion list (written when a deletion request is approved)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ConfigError(f"deletion list {path} (data.deleted) is not a file")
    if not path.is_file() or path.stat().st_size == 0:
        return set()
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ConfigError(f"deletion list {path} cannot be read: {' '.join(str(err).split())}") from None
    if "sample_id" not in table.columns:
        raise ConfigError(f"deletion list {path} has no sample_id column")
    ids = set()
    for row, cell in enumerate(table["sample_id"], start=2):
        if not _ID.fullmatch(cell.strip()):
            raise ConfigError(f"deletion list {path} line {row}: sample_id {cell!r} is not an id (ASCII digits)")
        ids.add(int(cell))
    return ids


def pseudo_user_ids(sample_ids: np.ndarray, samples_per_user: int, seed: int) -> np.ndarray:
    """Deterministic pseudo-users for data without user ids: a seeded shuffle, cut in groups."""
    order = np.random.default_rng(seed).permutation(len(sample_ids))
    users = np.empty(len(sample_ids), dtype=np.int64)
    users[order] = np.arange(len(sample_ids)) // samples_per_user
    return users


def assign_splits(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Stratified train/val/test assignment, computed on the full source so that deleting
    samples later never moves any other sample to another split."""
    for name, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"data.val_fraction + data.test_fraction must be < 1, got {val_fraction + test_fraction}")
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(members) * val_fraction))
        n_test = int(round(len(members) * test_fraction))
        split[members[:n_val]] = "val"
        split[members[n_val : n_val + n_test]] = "test"
        split[members[n_val + n_test :]] = "train"
    return split


def select_forget(table: pd.DataFrame, cfg: dict, num_classes: int) -> np.ndarray:
    """Boolean mask over `table` rows: which train samples form the forget set."""
    mode = choose(cfg["mode"], FORGET_MODES, "forget mode")
    rng = np.random.default_rng(int(cfg["seed"]))
    train = table["split"].to_numpy() == "train"
    forget = np.zeros(len(table), dtype=bool)
    if mode == "random":
        fraction = float(cfg["fraction"])
        if not 0 < fraction < 1:
            raise ConfigError(f"forget.fraction must be in (0, 1), got {fraction}")
        train_rows = np.flatnonzero(train)
        n = max(1, int(round(len(train_rows) * fraction)))
        forget[rng.choice(train_rows, size=n, replace=False)] = True
    elif mode == "users":
        users = np.unique(table.loc[train, "user_id"])
        n_users = int(cfg["n_users"])
        if not 1 <= n_users <= len(users):
            raise ConfigError(f"forget.n_users is {n_users} but the train split has {len(users)} users (need 1..{len(users)})")
        chosen = rng.choice(users, size=n_users, replace=False)
        forget = train & table["user_id"].isin(chosen).to_numpy()
    else:
        label = int(cfg["class"])
        if not 0 <= label < num_classes:
            raise ConfigError(f"forget.class is {label}; allowed: 0..{num_classes - 1}")
        forget = train & (table["label"].to_numpy() == label)
    if forget.sum() == train.sum():
        raise ConfigError("the forget set would be the whole train split; nothing would be left to retain")
    return forget


def _summary(table: pd.DataFrame, num_classes: int) -> dict:
    return {
        "n_samples": len(table),
        **{f"n_{s}": int((table["split"] == s).sum()) for s in SPLITS},
        "n_forget": int(table["forget"].sum()),
        "n_forget_users": int(table.loc[table["forget"], "user_id"].nunique()),
        "num_classes": num_classes,
    }


def _split_table(data_cfg: dict) -> tuple[Source, np.ndarray, pd.DataFrame]:
    """The source, which of its samples are kept (not deleted) and the kept samples' table (no forget set yet)."""
    source = load_source(data_cfg)
    labels = source.labels.numpy()
    users = source.user_ids
    if users is None:
        users = pseudo_user_ids(source.sample_ids, int(data_cfg["samples_per_pseudo_user"]), int(data_cfg["split_seed"]))
    table = pd.DataFrame(
        {
            "sample_id": source.sample_ids,
            "user_id": users,
            "label": labels,
            "split": assign_splits(labels, float(data_cfg["val_fraction"]), float(data_cfg["test_fraction"]), int(data_cfg["split_seed"])),
        }
    )
    keep = ~table["sample_id"].isin(read_deleted_ids(data_cfg["deleted"])).to_numpy()
    table = table[keep].reset_index(drop=True)
    table["forget"] = False
    return source, keep, table


def _write(out_dir: Path, source: Source, keep: np.ndarray, table: pd.DataFrame) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    keep_t = torch.from_numpy(keep)
    torch_save(
        out_dir / "images.pt",
        {
            "images": source.images[keep_t].contiguous(),
            "labels": source.labels[keep_t].contiguous(),
            "sample_ids": torch.from_numpy(table["sample_id"].to_numpy(copy=True)),
            "num_classes": source.num_classes,
        },
    )
    write_csv(out_dir / "samples.csv", table, index=False, quoting=csv.QUOTE_MINIMAL)
    return _summary(table, source.num_classes) | {"n_deleted": int((~keep).sum())}


def split(params: dict, out_dir: str | Path) -> dict:
    """Load the source, drop deleted samples, split; write images.pt and samples.csv (no forget set yet).

    The split depends on `data` only, so every forget set of a data set (`choose_forget`) is cut
    from the same train split and shares one target model."""
    return _write(Path(out_dir), *_split_table(params["data"]))


def choose_forget(params: dict, split_dir: str | Path, out_dir: str | Path) -> dict:
    """The forget set of `params["forget"]`, cut from `split_dir`'s train split: writes out_dir/samples.csv
    (the images stay in split_dir: `load_prepared(out_dir, split_dir)`)."""
    split_dir, out_dir = Path(split_dir), Path(out_dir)
    if not (split_dir / "samples.csv").is_file():
        raise ConfigError(f"split data missing: {split_dir / 'samples.csv'} (run the split stage)")
    table = pd.read_csv(split_dir / "samples.csv")
    num_classes = int(torch.load(split_dir / "images.pt", weights_only=True, mmap=True)["num_classes"])
    table["forget"] = select_forget(table, params["forget"], num_classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "samples.csv", table, index=False, quoting=csv.QUOTE_MINIMAL)
    return _summary(table, num_classes)


def prepare(params: dict, out_dir: str | Path) -> dict:
    """Split and choose the forget set into one folder (the flat layout of a single run); nothing
    is written if either fails."""
    source, keep, table = _split_table(params["data"])
    table["forget"] = select_forget(table, params["forget"], source.num_classes)
    return _write(Path(out_dir), source, keep, table)


# ---------------------------------------------------------------- reading prepared data


@dataclass
class Part:
    """One subset (retain, forget, val, test, ...) as normalised float tensors."""

    x: torch.Tensor
    y: torch.Tensor
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class PreparedData:
    parts: dict[str, Part]
    num_classes: int
    in_channels: int
    image_size: int

    def __getitem__(self, name: str) -> Part:
        return self.parts[name]


def load_prepared(out_dir: str | Path, images_dir: str | Path | None = None) -> PreparedData:
    """Read `prepare`'s samples.csv and the images.pt of `images_dir` (default: the same folder);
    images normalised with the train split's channel statistics."""
    out_dir = Path(out_dir)
    images_dir = out_dir if images_dir is None else Path(images_dir)
    for path in (images_dir / "images.pt", out_dir / "samples.csv"):
        if not path.is_file():
            raise ConfigError(f"prepared data missing: {path} (run the prepare stage)")
    blob = torch.load(images_dir / "images.pt", weights_only=True)
    table = pd.read_csv(out_dir / "samples.csv")
    if not np.array_equal(blob["sample_ids"].numpy(), table["sample_id"].to_numpy()):
        raise ConfigError(f"{out_dir}: images.pt and samples.csv disagree; rerun the prepare stage")
    x = blob["images"].float() / 255.0
    train = torch.from_numpy((table["split"] == "train").to_numpy().copy())
    mean = x[train].mean(dim=(0, 2, 3), keepdim=True)
    std = x[train].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    y = blob["labels"]
    masks = {
        "train": (table["split"] == "train").to_numpy(),
        "retain": ((table["split"] == "train") & ~table["forget"]).to_numpy(),
        "forget": table["forget"].to_numpy(),
        "val": (table["split"] == "val").to_numpy(),
        "test": (table["split"] == "test").to_numpy(),
    }
    parts = {}
    for name, mask in masks.items():
        index = torch.from_numpy(np.flatnonzero(mask))
        parts[name] = Part(x[index].contiguous(), y[index].contiguous(), table["sample_id"].to_numpy()[mask])
    return PreparedData(parts, int(blob["num_classes"]), x.shape[1], x.shape[2])
