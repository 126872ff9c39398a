"""Which implementations of the ops exist on this machine, and why the others do not.

Backends:
  reference  plain PyTorch (hyforget_fast.ops.reference); always available, any device
  cpp        C++ CPU kernels in the native library; CPU tensors
  cuda       CUDA kernels in the native library (compiled when nvcc was found); CUDA tensors
  triton     Triton kernels (hyforget_fast.kernels); CUDA tensors, or CPU tensors when
             TRITON_INTERPRET=1 was set before import
Importing this module never fails: a backend that cannot load is recorded with its reason.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")
_OPS = ("gather_pieces", "scatter_pieces", "class_metrics", "csr_linear")


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str


def _load_native() -> BackendStatus:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package root holds _C*.so
    libs = sorted(glob.glob(os.path.join(here, "_C*.so")))
    if not libs:
        return BackendStatus(False, f"native library _C*.so not found in {here} (package not built?)")
    try:
        torch.ops.load_library(libs[0])
    except OSError as e:  # e.g. a library built against another torch
        return BackendStatus(False, f"native library failed to load: {e}")
    return BackendStatus(True, f"loaded {os.path.basename(libs[0])}")


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"hyforget::{op}", key)
    except RuntimeError:
        return False


def _cuda_status(native: BackendStatus) -> BackendStatus:
    if not native.available:
        return BackendStatus(False, "native library not loaded")
    if not any(_has_kernel(op, "CUDA") for op in _OPS):
        return BackendStatus(False, "native library was built without CUDA (no nvcc, or HYFORGET_NO_CUDA=1)")
    if not torch.cuda.is_available():
        return BackendStatus(False, "CUDA kernels compiled, but no CUDA device is visible")
    return BackendStatus(True, f"CUDA kernels on {torch.cuda.get_device_name()}")


def import_kernels():
    """The Triton kernels package, hyforget_fast.kernels.

    An installed package carries it (setup.py maps the top-level kernels/ folder there); in a
    source checkout used through PYTHONPATH it is loaded from ../kernels under the same name.
    """
    name = "hyforget_fast.kernels"
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
    init = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "kernels", "__init__.py")
    if not os.path.exists(init):
        raise ModuleNotFoundError(f"{name} is not installed and no source kernels/ folder was found")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _triton_status() -> BackendStatus:
    try:
        import triton  # noqa: F401

        import_kernels()
    except Exception as e:  # ImportError, or a broken triton install
        return BackendStatus(False, f"triton unavailable: {type(e).__name__}: {e}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return BackendStatus(True, "triton interpreter (TRITON_INTERPRET=1): runs on CPU tensors, slowly")
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    return BackendStatus(False, "triton imported, but no GPU and TRITON_INTERPRET is not 1")


_NATIVE = _load_native()
_STATUS = {
    "reference": BackendStatus(True, "plain PyTorch, always available"),
    "cpp": BackendStatus(_NATIVE.available and any(_has_kernel(op, "CPU") for op in _OPS), _NATIVE.reason),
    "cuda": _cuda_status(_NATIVE),
}


def _status() -> dict[str, BackendStatus]:
    # Triton is probed on first use, not at import: importing triton is slow and the kernels
    # package imports hyforget_fast itself.
    if "triton" not in _STATUS:
        _STATUS["triton"] = _triton_status()
    return _STATUS


def backends() -> dict[str, BackendStatus]:
    """Every backend, whether it loaded, and why (not)."""
    return dict(_status())


def native_has(op: str, device: torch.device) -> bool:
    """Whether the native library registered `op` for the device's dispatch key."""
    return _NATIVE.available and _has_kernel(op, "CUDA" if device.type == "cuda" else "CPU")


def pick(op: str, device: torch.device, backend: str | None) -> str:
    """The backend that runs `op` on tensors on `device`: `backend` if given, else the fastest."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
        st = _status()[backend]
        if not st.available:
            raise RuntimeError(f"backend {backend!r} is not available: {st.reason}")
        if backend == "cpp" and device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}")
        if backend == "cuda" and device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
        if backend in ("cpp", "cuda") and not native_has(op, device):
            raise RuntimeError(f"backend {backend!r} has no kernel for {op}")
        if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        return backend
    if device.type == "cuda":
        if _STATUS["cuda"].available and native_has(op, device):
            return "cuda"
        if _status()["triton"].available:
            return "triton"
        return "reference"
    if device.type == "cpu" and _STATUS["cpp"].available and native_has(op, device):
        return "cpp"
    return "reference"


def native_loaded() -> bool:
    return _NATIVE.available
