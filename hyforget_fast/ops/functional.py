"""Public ops: validate inputs, then dispatch to a backend (see hyforget_fast.ops.backends).

Every op takes `backend=None` (fastest available for the tensors' device) or one of
"reference", "cpp", "cuda", "triton" to force an implementation.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from .backends import import_kernels as _kernels
from .backends import native_loaded as _native_loaded
from .backends import pick as _pick
from . import reference as _ref
from .spec import MLPSpec, ParamNorm, TokenLayout

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# Fake (meta) kernels so the native ops trace under torch.compile / FakeTensor.
if _native_loaded():
    @torch.library.register_fake("hyforget::gather_pieces")
    def _gather_pieces_fake(params, table, perms, norm, out_width):
        return params.new_empty((params.shape[0], out_width))

    @torch.library.register_fake("hyforget::gather_pieces_out")
    def _gather_pieces_out_fake(params, table, perms, norm, out):
        return None

    @torch.library.register_fake("hyforget::scatter_pieces")
    def _scatter_pieces_fake(tokens, table, norm, out_width):
        return tokens.new_empty((tokens.shape[0], out_width))

    @torch.library.register_fake("hyforget::class_metrics")
    def _class_metrics_fake(params, X, y, layer_sizes, num_classes):
        shape = (params.shape[0], num_classes)
        return params.new_empty(shape, dtype=torch.float32), params.new_empty(shape, dtype=torch.float32)

    @torch.library.register_fake("hyforget::class_metrics_csr")
    def _class_metrics_csr_fake(params, crow, col, val, y, layer_sizes, num_classes):
        shape = (params.shape[0], num_classes)
        return params.new_empty(shape, dtype=torch.float32), params.new_empty(shape, dtype=torch.float32)

    @torch.library.register_fake("hyforget::class_metrics_runs_csr")
    def _class_metrics_runs_csr_fake(w1t, b1, head, runs, crow, col, val, y, layer_sizes, num_classes):
        shape = (runs.shape[0], num_classes)
        return w1t.new_empty(shape, dtype=torch.float32), w1t.new_empty(shape, dtype=torch.float32)

    @torch.library.register_fake("hyforget::csr_linear")
    def _csr_linear_fake(crow, col, val, rows, weight_t, bias):
        m = crow.shape[0] - 1 if rows is None else rows.shape[0]
        return weight_t.new_empty((m, weight_t.shape[1]))

    @torch.library.register_fake("hyforget::mlp_head_sgd_")
    def _mlp_head_sgd_fake(z1, head, b1, y, wn, lr, layer_sizes):
        return z1.new_empty(z1.shape)

    @torch.library.register_fake("hyforget::csr_linear_sub_grad_")
    def _csr_linear_sub_grad_fake(crow, col, val, rows, grad, weight_t):
        return None


def _check_params(params: torch.Tensor, spec: MLPSpec, what: str = "params") -> None:
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(params).__name__}")
    if params.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16, bfloat16 or float64, got {params.dtype}")
    if params.ndim != 2 or params.shape[1] != spec.num_params:
        raise ValueError(f"{what} must have shape (B, {spec.num_params}) for MLPSpec{spec.layer_sizes}, "
                         f"got {tuple(params.shape)}")


def validate_perms(perms: torch.Tensor, spec: MLPSpec, batch: int, device: torch.device) -> None:
    """Raise if perms is not (batch, H) int64 on `device` with a true permutation per hidden layer."""
    H = spec.num_hidden_units
    if not isinstance(perms, torch.Tensor):
        raise TypeError(f"perms must be a torch.Tensor, got {type(perms).__name__}")
    if perms.dtype != torch.int64:
        raise TypeError(f"perms must be int64, got {perms.dtype}")
    if perms.shape != (batch, H):
        raise ValueError(f"perms must have shape ({batch}, {H}) for hidden sizes {spec.hidden_sizes}, "
                         f"got {tuple(perms.shape)}")
    if perms.device != device:
        raise ValueError(f"perms is on {perms.device} but params are on {device}")
    for k, (o, h) in enumerate(zip(spec.hidden_offsets, spec.hidden_sizes)):
        seg = perms[:, o:o + h]
        ok = torch.equal(seg.sort(dim=1).values, torch.arange(h, device=device).expand(batch, h))
        if not ok:
            bad = int((seg.sort(dim=1).values != torch.arange(h, device=device)).any(1).nonzero()[0, 0])
            raise ValueError(f"perms row {bad} is not a permutation of hidden layer {k} (size {h}): "
                             f"{seg[bad].tolist()}")


def sample_perms(spec: MLPSpec, batch: int, *, generator: torch.Generator | None = None,
                 seed: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """One uniformly random hidden-unit permutation per sample and hidden layer -> (batch, H) int64.

    Drawn on `device` (the generator's device when a generator is given) from `generator`,
    or from a fresh generator seeded with `seed`.
    """
    if generator is None:
        device = torch.device(device or "cpu")
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else int(seed))
    else:
        device = generator.device
    keys = torch.rand(batch, spec.num_hidden_units, generator=generator, device=device)  # (B, H)
    segs = [keys[:, o:o + h].argsort(dim=1) for o, h in zip(spec.hidden_offsets, spec.hidden_sizes)]
    return torch.cat(segs, 1)


def canonical_perms(params: torch.Tensor, spec: MLPSpec) -> torch.Tensor:
    """The canonical hidden-unit order of each network -> (B, H) int64 perms for tokenize/permute.

    Hidden layer l's units are sorted by the L2 norm of their INCOMING weights (row j of W_l),
    largest first, ties kept in index order (stable sort). That norm does not change when the
    previous layer's units are permuted (it permutes the row's entries), so each layer's order
    is well defined layer by layer, and applying the perms gives a network that computes the
    same function whose canonical perms are the identity (canonicalising twice = once).
    params (B, P) float -> perms (B, H) on params' device.
    """
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be an MLPSpec, got {type(spec).__name__}")
    _check_params(params, spec)
    segs = []
    for l in range(spec.num_layers - 1):
        ws, _ = spec.layer_slices(l)
        W = params[:, ws].unflatten(1, (spec.layer_sizes[l + 1], spec.layer_sizes[l]))   # (B, h, in)
        key = W.double().pow(2).sum(2)                                                    # (B, h)
        segs.append(torch.argsort(-key, dim=1, stable=True))
    return torch.cat(segs, 1)


def class_losses(params: torch.Tensor, spec: MLPSpec, X: torch.Tensor, y: torch.Tensor,
                 num_classes: int | None = None) -> torch.Tensor:
    """Per-class mean cross-entropy (B, m) of B MLPs on (X (N, D), y (N,)), DIFFERENTIABLE w.r.t.
    params (B, P): the reference's math (reference.class_sums) under autograd, in params' dtype.
    Classes absent from y get NaN. For scoring without gradients use class_metrics (fused)."""
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be an MLPSpec, got {type(spec).__name__}")
    _check_params(params, spec)
    m = spec.num_classes if num_classes is None else int(num_classes)
    logp = torch.log_softmax(_ref.mlp_logits(params, spec, X.to(params.dtype)), dim=-1)   # (B, N, m)
    loss = -logp.gather(2, y[None, :, None].expand(params.shape[0], -1, 1)).squeeze(2)    # (B, N)
    sums = loss.new_zeros(params.shape[0], m).index_add(1, y, loss)                       # (B, m)
    counts = torch.bincount(y, minlength=m).to(loss.dtype)
    return sums / counts.where(counts > 0, torch.full_like(counts, float("nan")))


def _norm_table(norm: ParamNorm | None, spec: MLPSpec, device: torch.device) -> torch.Tensor | None:
    if norm is None:
        return None
    if not isinstance(norm, ParamNorm):
        raise TypeError(f"norm must be a ParamNorm, got {type(norm).__name__}")
    if norm.spec != spec:
        raise ValueError(f"norm was fitted for MLPSpec{norm.spec.layer_sizes}, not MLPSpec{spec.layer_sizes}")
    return norm.stats.to(device)


def _pick_gather(op: str, x: torch.Tensor, backend: str | None) -> str:
    """Backend of a gather op; float64 has kernels only in C++, elsewhere the reference runs it."""
    be = _pick(op, x.device, backend)
    return "reference" if x.dtype == torch.float64 and be != "cpp" else be


def _gather(params, table, perms, norm_t, out_width, backend, out=None, strided=False):
    table = table.to(params.device)
    if backend == "triton":
        return _kernels().tokenize.gather_pieces(params, table, perms, norm_t, out_width, out=out, strided=strided)
    if out is None:
        return torch.ops.hyforget.gather_pieces(params, table, perms, norm_t, out_width)
    torch.ops.hyforget.gather_pieces_out(params, table, perms, norm_t, out)
    return out


def _check_out(out: torch.Tensor, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A caller's output buffer: right shape, dtype, device, contiguous. Returns its (B, W) view."""
    if out.shape != shape or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {shape} on {like.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out.view(shape[0], -1)


def tokenize(params: torch.Tensor, layout: TokenLayout, perms: torch.Tensor | None = None,
             norm: ParamNorm | None = None, *, validate: bool = True, backend: str | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused permute + normalize + tokenize, one pass over memory: (B, P) -> (B, T, C).

    layout: a TokenLayout of either kind ("layer": C = chunk; "neuron": one token per hidden
    unit, C = in + 1 + out). perms: (B, H) int64 hidden-unit permutations (see sample_perms),
    applied as in reference.permute; with neuron tokens they permute the unit tokens. norm: a
    ParamNorm applied per piece. Padding is zero.
    validate=True checks that every perms row is a permutation (one extra pass over perms).
    out: an optional (B, T, chunk) buffer to write into (saves allocating, and on the CPU
    page-faulting, a fresh output every call).
    """
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    spec = layout.spec
    _check_params(params, spec)
    if perms is not None and validate:
        validate_perms(perms, spec, params.shape[0], params.device)
    shape = (params.shape[0], layout.num_tokens, layout.chunk)
    flat_out = _check_out(out, shape, params) if out is not None else None
    be = _pick_gather("gather_pieces", params, backend)
    if be == "reference":
        res = _ref.tokenize(params, layout, perms, norm)
        return res if out is None else out.copy_(res)
    res = _gather(params, layout.table, perms, _norm_table(norm, spec, params.device),
                  layout.num_tokens * layout.chunk, be, flat_out, layout.strided)
    return res.view(shape)  # (B, T, chunk)


def detokenize(tokens: torch.Tensor, layout: TokenLayout, norm: ParamNorm | None = None, *,
               backend: str | None = None) -> torch.Tensor:
    """Exact inverse of tokenize (without perms): (B, T, C) -> (B, P), padding dropped; either layout kind."""
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"tokens must be a floating-point tensor, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.ndim != 3 or tokens.shape[1:] != (layout.num_tokens, layout.chunk):
        raise ValueError(f"tokens must have shape (B, {layout.num_tokens}, {layout.chunk}) for {layout}, "
                         f"got {tuple(tokens.shape)}")
    be = _pick_gather("scatter_pieces", tokens, backend)
    if be == "reference":
        return _ref.detokenize(tokens, layout, norm)
    flat = tokens.reshape(tokens.shape[0], -1)  # (B, T*chunk)
    norm_t = _norm_table(norm, layout.spec, tokens.device)
    P = layout.spec.num_params
    if be == "triton":
        _tk = _kernels().tokenize
        return _tk.scatter_pieces(flat, layout.table.to(tokens.device), norm_t, P, strided=layout.strided)
    return torch.ops.hyforget.scatter_pieces(flat, layout.table.to(tokens.device), norm_t, P)


def permute(params: torch.Tensor, spec: MLPSpec, perms: torch.Tensor, *, validate: bool = True,
            backend: str | None = None) -> torch.Tensor:
    """Permute hidden units of flat parameter vectors (B, P) -> (B, P); the MLP's function is unchanged."""
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be an MLPSpec, got {type(spec).__name__}")
    _check_params(params, spec)
    if validate:
        validate_perms(perms, spec, params.shape[0], params.device)
    be = _pick_gather("gather_pieces", params, backend)
    if be == "reference":
        return _ref.permute(params, spec, perms)
    return _gather(params, spec.flat_table, perms, None, spec.num_params, be)


class ClassMetrics(NamedTuple):
    """Metrics of B networks on one labelled set with m classes, all float32.

    class_loss (B, m) mean cross-entropy per class; class_acc (B, m) accuracy per class;
    loss (B,) and acc (B,) over all N inputs. A class absent from y is NaN in class_loss and
    class_acc (never 0): its mean is undefined. A network with any NaN/Inf parameter is NaN in
    every field; its neighbours in the batch are unaffected.
    """

    class_loss: torch.Tensor
    class_acc: torch.Tensor
    loss: torch.Tensor
    acc: torch.Tensor


def _unpack_spec(spec: MLPSpec | TokenLayout) -> tuple[MLPSpec, TokenLayout | None]:
    if isinstance(spec, TokenLayout):
        return spec.spec, spec
    if isinstance(spec, MLPSpec):
        return spec, None
    raise TypeError(f"spec must be an MLPSpec or a TokenLayout, got {type(spec).__name__}")


def _check_params_or_tokens(params: torch.Tensor, spec: MLPSpec, layout: TokenLayout | None) -> None:
    if layout is None:
        _check_params(params, spec)
        return
    if not isinstance(params, torch.Tensor) or params.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"tokens must be a floating-point tensor, got {getattr(params, 'dtype', type(params).__name__)}")
    if params.ndim != 3 or params.shape[1:] != (layout.num_tokens, layout.chunk):
        raise ValueError(f"tokens must have shape (B, {layout.num_tokens}, {layout.chunk}) for {layout}, "
                         f"got {tuple(params.shape)}")


def _check_inputs(params: torch.Tensor, spec: MLPSpec, X: torch.Tensor) -> None:
    """X (N, D) must match the spec and the params' dtype and device, and be finite."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.layout not in (torch.strided, torch.sparse_csr):
        raise TypeError(f"X must be a dense or sparse CSR tensor, got layout {X.layout}")
    if X.ndim != 2 or X.shape[1] != spec.in_features:
        raise ValueError(f"X must have shape (N, {spec.in_features}) for MLPSpec{spec.layer_sizes}, "
                         f"got {tuple(X.shape)}")
    if X.dtype != params.dtype:
        raise TypeError(f"dtype mismatch: X is {X.dtype} but params are {params.dtype}")
    if X.device != params.device:
        raise ValueError(f"device mismatch: X is on {X.device} but params are on {params.device}")
    if not _finite_checked(X):
        if not bool(torch.isfinite(X.values() if X.layout == torch.sparse_csr else X).all()):
            raise ValueError("X contains NaN or Inf; every network's metrics would be NaN")
        _remember_finite(X)


# The last few X found finite, so that scoring the same set every step (checkpoint collection)
# does not re-scan it: a weak reference (a freed X can never match) plus its version counter
# (an in-place write invalidates the entry).
_FINITE_X: list[tuple[weakref.ref, int]] = []


def _finite_checked(X: torch.Tensor) -> bool:
    return any(r() is X and v == X._version for r, v in _FINITE_X)


def _remember_finite(X: torch.Tensor) -> None:
    _FINITE_X.append((weakref.ref(X), X._version))
    del _FINITE_X[:-4]


def _check_labels(y: torch.Tensor, X: torch.Tensor, num_classes: int) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise TypeError(f"y must be int64 labels, got {y.dtype}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape ({X.shape[0]},) like X's rows, got {tuple(y.shape)}")
    if y.device != X.device:
        raise ValueError(f"device mismatch: y is on {y.device} but X is on {X.device}")
    if y.numel():
        lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one pass, one device sync
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got range [{lo}, {hi}]")


def _default_max_batch(spec: MLPSpec, N: int, backend: str) -> int:
    """Networks per slice: the reference holds (B, N, width) activations, so bound those to
    ~2^27 values; the fused kernels hold only O(B*m) plus tiles, so slices just bound the
    per-slice copies of the params (detokenized tokens, a contiguous copy) to 2^28 values."""
    if backend == "reference":
        return max(1, (1 << 27) // max(1, N * max(spec.layer_sizes[1:])))
    return max(1, (1 << 28) // spec.num_params)


_GPU_MAX_WIDTH, _GPU_MAX_LAYERS = 64, 16  # csrc/cuda/launchers.h, kernels/class_metrics.py


def _gpu_supports(spec: MLPSpec, dtype: torch.dtype) -> bool:
    """Whether the GPU kernels handle this spec and dtype (no float64; widths <= 64 in registers)."""
    return (dtype != torch.float64 and max(spec.layer_sizes[1:]) <= _GPU_MAX_WIDTH
            and spec.num_layers <= _GPU_MAX_LAYERS)


def _class_sums(params: torch.Tensor, spec: MLPSpec, X: torch.Tensor, y: torch.Tensor, num_classes: int,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (loss sum, correct count), each (B, m) float32, from one backend."""
    sizes = list(spec.layer_sizes)
    if X.layout == torch.sparse_csr:  # class_metrics densified it for every other backend
        return torch.ops.hyforget.class_metrics_csr(params, *_csr_arrays(X), y, sizes, num_classes)
    if backend == "reference":
        return _ref.class_sums(params, spec, X, y, num_classes)
    if backend == "triton":
        return _kernels().class_metrics.class_sums(params, sizes, X, y, num_classes)
    return torch.ops.hyforget.class_metrics(params, X, y, sizes, num_classes)


def class_metrics(params: torch.Tensor, spec: MLPSpec | TokenLayout, X: torch.Tensor, y: torch.Tensor,
                  num_classes: int | None = None, *, max_batch: int | None = None,
                  backend: str | None = None) -> ClassMetrics:
    """Per-class loss and accuracy of B ReLU MLPs on the same inputs, fused.

    params: (B, P) flat vectors, or (B, T, chunk) tokens when `spec` is a TokenLayout.
    X (N, D) with the params' dtype and device; y (N,) int64 labels in [0, num_classes).
    X may be a sparse CSR tensor (`X.to_sparse_csr()`): on the CPU the first layer then reads
    only its nonzeros (pixel data is mostly zero); other backends densify it.
    num_classes defaults to the output width (it may be smaller, never larger).
    B is processed in slices of at most `max_batch` networks so memory stays bounded; the
    fused backends never hold (B, N, hidden) or (B, N, m) tensors. Returns ClassMetrics.
    """
    spec, layout = _unpack_spec(spec)
    _check_params_or_tokens(params, spec, layout)
    _check_inputs(params, spec, X)
    m = spec.num_classes if num_classes is None else int(num_classes)
    if not 1 <= m <= spec.num_classes:
        raise ValueError(f"num_classes must be in [1, {spec.num_classes}] (the output width), got {num_classes}")
    _check_labels(y, X, m)
    be = _pick("class_metrics", params.device, backend)
    if backend is None and be in ("cuda", "triton") and not _gpu_supports(spec, params.dtype):
        be = "reference"
    if X.layout == torch.sparse_csr and not (be == "cpp" and X.dtype in (torch.float32, torch.float64)):
        X = X.to_dense()  # only the C++ kernel reads CSR; densify once, not per slice
    if max_batch is None:
        max_batch = _default_max_batch(spec, X.shape[0], be)
    if int(max_batch) != max_batch or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    sums = []
    for b0 in range(0, params.shape[0], int(max_batch)):
        p = params[b0:b0 + int(max_batch)]
        if layout is not None:
            p = detokenize(p, layout)  # (b, P)
        loss_sum, correct_sum = _class_sums(p, spec, X, y, m, be)  # (b, m) each
        bad = _non_finite_rows(p)  # (b,) networks with NaN/Inf parameters
        sums.append((loss_sum, correct_sum, bad))
    return _finish(sums, y, m, params.device)


def _non_finite_rows(p: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """(B,) bool: rows of p (B, P) holding a NaN or Inf. In slices of rows, because isfinite
    allocates float temporaries as large as its input."""
    return torch.cat([~torch.isfinite(p[i:i + rows]).all(dim=1) for i in range(0, p.shape[0], rows)]
                     or [torch.zeros(0, dtype=torch.bool, device=p.device)])


def _finish(sums, y: torch.Tensor, m: int, device: torch.device) -> ClassMetrics:
    """Per-class sums of each slice -> means; absent classes and broken networks -> NaN."""
    if sums:
        loss_sum = torch.cat([s[0] for s in sums]).double()  # (B, m)
        correct_sum = torch.cat([s[1] for s in sums]).double()
        bad = torch.cat([s[2] for s in sums])
    else:
        loss_sum = correct_sum = torch.zeros(0, m, dtype=torch.float64, device=device)
        bad = torch.zeros(0, dtype=torch.bool, device=device)
    counts = torch.bincount(y, minlength=m)[:m].double()  # (m,)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    class_loss = torch.where(counts > 0, loss_sum / counts.clamp(min=1), nan)
    class_acc = torch.where(counts > 0, correct_sum / counts.clamp(min=1), nan)
    n = max(1, y.numel())
    loss = loss_sum.sum(1) / n if y.numel() else torch.full_like(loss_sum[:, 0], float("nan"))
    acc = correct_sum.sum(1) / n if y.numel() else torch.full_like(loss_sum[:, 0], float("nan"))
    out = [class_loss, class_acc, loss, acc]
    out = [torch.where(bad.view(-1, *([1] * (t.ndim - 1))), nan, t).float() for t in out]
    return ClassMetrics(*out)


def class_outputs(params: torch.Tensor, spec: MLPSpec | TokenLayout, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample outputs of a few networks: softmax probabilities (B, N, m) and predictions (B, N).

    Materializes (B, N, width) activations, so it is meant for the handful of models that
    the unlearning metrics compare; use class_metrics for many. Half/bfloat16 params are
    evaluated in float32, and probabilities are float32 (float64 for float64 params).
    """
    spec, layout = _unpack_spec(spec)
    _check_params_or_tokens(params, spec, layout)
    _check_inputs(params, spec, X)
    p = detokenize(params, layout) if layout is not None else params
    if p.dtype in (torch.float16, torch.bfloat16):
        p, X = p.float(), X.float()
    return _ref.class_outputs(p, spec, X)


# ----------------------------------------------------------------------------- sparse first layer
def _check_csr(X: torch.Tensor, what: str = "X") -> None:
    if not isinstance(X, torch.Tensor) or X.layout != torch.sparse_csr or X.ndim != 2:
        raise TypeError(f"{what} must be a 2-D sparse CSR tensor (X.to_sparse_csr()), got "
                        f"{getattr(X, 'layout', type(X).__name__)}")


def _check_rows(rows: torch.Tensor | None, X: torch.Tensor) -> int:
    """-> the number of rows taken: len(rows), or all of X's."""
    if rows is None:
        return X.shape[0]
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.ndim != 1:
        raise TypeError(f"rows must be a 1-D int64 tensor, got {getattr(rows, 'dtype', type(rows).__name__)}")
    if rows.device != X.device:
        raise ValueError(f"device mismatch: rows is on {rows.device} but X is on {X.device}")
    if rows.numel():
        lo, hi = torch.stack(torch.aminmax(rows)).tolist()
        if lo < 0 or hi >= X.shape[0]:
            raise ValueError(f"rows must be in [0, {X.shape[0]}), got range [{lo}, {hi}]")
    return rows.numel()


def _check_dense(t: torch.Tensor, what: str, shape: tuple, X: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise TypeError(f"{what} must be a dense tensor, got {getattr(t, 'layout', type(t).__name__)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != X.dtype:
        raise TypeError(f"dtype mismatch: {what} is {t.dtype} but X is {X.dtype}")
    if t.device != X.device:
        raise ValueError(f"device mismatch: {what} is on {t.device} but X is on {X.device}")


def _check_weight_t(weight_t: torch.Tensor, X: torch.Tensor) -> None:
    if not isinstance(weight_t, torch.Tensor) or weight_t.ndim != 2:
        raise ValueError(f"weight_t must be a 2-D tensor ({X.shape[1]}, C), got {getattr(weight_t, 'shape', None)}")
    _check_dense(weight_t, "weight_t", (X.shape[1], weight_t.shape[1]), X)


def _csr_arrays(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return X.crow_indices().long().contiguous(), X.col_indices().long().contiguous(), X.values().contiguous()


def _csr_backend(X: torch.Tensor, backend: str | None) -> str:
    if backend not in (None, "reference", "cpp"):
        raise ValueError(f"csr_linear has backends 'reference' and 'cpp', got {backend!r}")
    be = _pick("csr_linear", X.device, backend)
    return be if X.dtype in (torch.float32, torch.float64) else "reference"


def csr_linear(X: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None, *,
               rows: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Sparse-input linear layer: X[rows] @ weight_t + bias -> (M, C).

    X (N, D) sparse CSR; weight_t (D, C) is the layer's weight TRANSPOSED, so that each nonzero
    of X reads one contiguous weight row (unit column stride required, row stride free, so a
    column slice of a wider matrix works); bias (C,); rows (M,) int64 picks rows of X (a
    minibatch) without copying them. On the CPU only the nonzeros are read (C++ kernel); on other
    devices, or for half precision, X is densified and multiplied by a GEMM.
    """
    _check_csr(X)
    _check_rows(rows, X)
    _check_weight_t(weight_t, X)
    if bias is not None:
        _check_dense(bias, "bias", (weight_t.shape[1],), X)
    if _csr_backend(X, backend) == "reference" or weight_t.stride(1) != 1:
        return _ref.csr_linear(X, weight_t, bias, rows)
    return torch.ops.hyforget.csr_linear(*_csr_arrays(X), rows, weight_t, None if bias is None else bias.contiguous())


def csr_linear_sub_grad_(X: torch.Tensor, grad: torch.Tensor, weight_t: torch.Tensor, *,
                         rows: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """In place: weight_t -= X[rows]^T @ grad, the SGD step of a sparse-input layer whose
    learning rate is folded into grad (M, C). Only the weight rows of columns that some taken
    row of X uses are touched. Returns weight_t."""
    _check_csr(X)
    M = _check_rows(rows, X)
    _check_weight_t(weight_t, X)
    _check_dense(grad, "grad", (M, weight_t.shape[1]), X)
    if _csr_backend(X, backend) == "reference" or weight_t.stride(1) != 1:
        return weight_t.copy_(_ref.csr_linear_sub_grad(X, grad, weight_t, rows))
    torch.ops.hyforget.csr_linear_sub_grad_(*_csr_arrays(X), rows, grad.contiguous(), weight_t)
    return weight_t
