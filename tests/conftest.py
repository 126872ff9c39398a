"""Shared test setup and hypothesis strategies.

Without a GPU the Triton kernels run under the interpreter on CPU tensors; triton decides
interpreter vs compiler when a kernel is decorated, so the variable is set here, before any
test module imports hyforget_fast.
"""
import os
import random
import zlib

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hyforget_fast as hf  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ODD_WIDTHS = (1, 2, 3, 5, 7, 13)


@pytest.fixture(autouse=True)
def _seed_global_rngs(request):
    """Seed torch's, numpy's and Python's global generators from the test's id, so a test
    that draws from them unseeded sees the same numbers on every run and in any order."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@st.composite
def mlp_specs(draw, max_hidden_layers: int = 4, max_in: int = 41) -> hf.MLPSpec:
    """ReLU MLP specs with 1..max_hidden_layers hidden layers of odd/small widths."""
    depth = draw(st.integers(1, max_hidden_layers))
    d_in = draw(st.integers(1, max_in))
    hidden = draw(st.lists(st.sampled_from(ODD_WIDTHS), min_size=depth, max_size=depth))
    d_out = draw(st.integers(2, 11))
    return hf.MLPSpec([d_in, *hidden, d_out])


def gather_backends_for_tests() -> list[tuple[str, str]]:
    """(backend, device) pairs to test gathers on: every backend, skipped where it cannot run."""
    return [("reference", "cpu"), ("cpp", "cpu"),
            pytest.param("cuda", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
            ("triton", "cuda" if torch.cuda.is_available() else "cpu")]


def class_metrics_backends_for_tests() -> list:
    """(backend, device) pairs for class_metrics: every backend; CUDA only where a GPU is
    visible, Triton on CUDA or under the interpreter on CPU tensors."""
    return [("reference", "cpu"), ("cpp", "cpu"),
            pytest.param("cuda", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
            ("triton", "cuda" if torch.cuda.is_available() else "cpu")]


@st.composite
def labelled_sets(draw, d_in: int, num_classes: int, sizes=(1, 2, 97, 997)):
    """(X (N, d_in) float64, y (N,) int64, seed): N drawn from `sizes` (odd on purpose) or 3..300."""
    n = draw(st.one_of(st.sampled_from(sizes), st.integers(3, 300)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return X, y, seed
