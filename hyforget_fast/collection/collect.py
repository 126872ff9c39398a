"""Checkpoint collection (dissertation §3.3.1, §3.4.1): R MLP runs trained at once.

One *block* = `block_runs` runs trained as a single batched computation, seeded from
(seed, block index), with its own bin counters, written as one shard. Blocks are independent,
so resume (skip finished shards) and multi-rank (rank r does blocks k ≡ r mod W) reproduce a
1-process run exactly.

Per run: log-uniform learning rate, per-class undersampling (keep) rates, optional forgetting
phase (from a random step on, chosen non-pivot classes get weight 0, so their losses rise). At
random steps a run *offers* its parameters; offers are scored on the VALIDATION split and saved
only if every pivot class has accuracy >= gamma and the checkpoint's loss bin (joint cell of the
non-pivot classes' loss levels) holds fewer than `bin_cap` checkpoints in the block. Initial
parameters are saved too. Optional holdout rules (CollectConfig.holdout) keep chosen validation
loss combinations out of the store entirely, for held-out-combination experiments.

Shared minibatch, importance-weighted loss (format 2 of the training objective). Every step
draws ONE minibatch of `batch_size` training indices for the whole block (the next slice of a
per-epoch random permutation, shared by all runs). A run's undersampling rates and forgetting
phase are realised as per-example loss weights w[r, i] = keep[r, y_i] (0 for a forgotten class)
and each run minimises its weighted mean cross-entropy sum_i w[r,i] CE_i / sum_i w[r,i]. This is
importance weighting instead of subsampling: a run whose sampling distribution is
p_r(i) ∝ keep[r, y_i] sees the same expected loss / gradient (the weighted mean is the
self-normalised importance-sampling estimate of E_{p_r}[CE], exact up to its O(1/batch) ratio
bias), forgotten classes get exactly zero gradient, but the per-run effective batch is
(sum w)^2 / sum w^2 <= batch_size (e.g. ~26 of 32 for a run with 2 of 10 classes removed). What
it buys: the first layer of all R runs is one GEMM X_b (S, D) @ W1_all^T (D, R*H) forward and
one GEMM G^T (R*H, S) @ X_b (S, D) for its weight gradient, with no (R, S, D) gather.

Sparse first layer (CPU). Pixel inputs are mostly zero (MNIST: ~23% of the used pixels of an
image are nonzero), so on the CPU the first layer's forward, its SGD update and the scoring
product read only the nonzeros: X is kept as CSR and the first-layer weights of all runs as
one TRANSPOSED matrix W1T (Da, R*H), so that a nonzero pixel touches one contiguous weight
row (native ops csr_linear / csr_linear_sub_grad_; the later layers of all runs are one more
op, mlp_head_sgd_). That is ~4x fewer multiply-adds than dense GEMMs; bench/RESULTS.md §3 has
the timings. Off the CPU the same W1T is used with dense GEMMs and batched torch ops.

Scoring. All offers of a step are scored exactly in one call of the fused per-class evaluator
on the validation split (on the CPU its CSR form class_metrics_runs_csr, reading the runs
straight from W1T / b1 / head; elsewhere ops.class_metrics), and the rules (pivot accuracy >=
gamma, bin caps) are applied to those values, so every saved loss / accuracy is an evaluation
of the saved parameters.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops.spec import MLPSpec
from ..configs import strict_fields
from ..dist import barrier, dist_setup

PHASE_INIT, PHASE_TRAIN, PHASE_FORGET = 0, 1, 2
PHASE_NAMES = {PHASE_INIT: "init", PHASE_TRAIN: "train", PHASE_FORGET: "forget"}


@dataclass(frozen=True)
class CollectConfig:
    """Every knob of a collection. Classes and pivots are digit labels."""

    classes: tuple[int, ...] = (0, 1, 2, 3)
    pivots: tuple[int, ...] = (0, 1)
    hidden: tuple[int, ...] = (2,)
    gamma: float = 0.8                 # pivot accuracy threshold
    ckpts_per_run: int = 150           # saves per run (not counting the initial params)
    runs: int = 256
    block_runs: int = 128              # runs per block = per shard = per batched computation
    epochs: int = 25
    batch_size: int = 32
    lr_range: tuple[float, float] = (0.01, 0.3)      # log-uniform per run
    undersample_prob: float = 0.5      # chance that a non-pivot class is undersampled in a run
    keep_range: tuple[float, float] = (0.0, 0.5)     # keep rate of an undersampled class
    forget_prob: float = 0.5           # chance that a run has a forgetting phase
    forget_at: tuple[float, float] = (0.3, 0.8)      # its start, as a fraction of training
    forget_max_classes: int = 2        # 1..this many non-pivot classes removed
    bin_edges: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # loss levels, per non-pivot class
    bin_cap_frac: float = 0.05         # cap per bin = this fraction of a block's save slots
    offer_factor: float = 1.5          # expected offers per save slot
    schedule: str = "uniform"          # "uniform" or "early_late" (DiHyFo-2, §3.4.1)
    seed: int = 0
    split_seed: int = 0
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    # Held-out combinations: rules, each a conjunction of (class label, side, threshold)
    # conditions on the VALIDATION metrics: "high": loss > threshold, "low": loss < threshold,
    # "acc_high": accuracy >= threshold, "acc_low": accuracy <= threshold. Accuracy rules state
    # what forgetting means: ((3, "acc_low", 0.2), (0, "acc_high", 0.8), ...) keeps out every
    # checkpoint that the forget-{3} selection rule would accept. A checkpoint meeting every
    # condition of some rule is never saved (initial params included), so the store never holds
    # that combination. Empty = no rule; then to_dict omits the field, keeping the
    # collection.json of older collections identical.
    holdout: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "holdout", _normalise_holdout(self.holdout, self.classes))
        bad = [p for p in self.pivots if p not in self.classes]
        if bad:
            raise ValueError(f"pivots {bad} are not among classes {self.classes}")
        if len(self.free_classes) == 0:
            raise ValueError("at least one class must be a non-pivot (free) class")
        for name in ("forget_prob", "undersample_prob"):
            if not 0 <= float(getattr(self, name)) <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma is an accuracy threshold in [0, 1], got {self.gamma}")
        for name in ("ckpts_per_run", "runs", "block_runs", "epochs", "batch_size", "forget_max_classes"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.schedule not in ("uniform", "early_late"):
            raise ValueError(f"schedule must be 'uniform' or 'early_late', got {self.schedule!r}")
        if list(self.bin_edges) != sorted(self.bin_edges):
            raise ValueError(f"bin_edges must be increasing, got {self.bin_edges}")
        if not (0 < self.lr_range[0] <= self.lr_range[1]):
            raise ValueError(f"lr_range must be 0 < lo <= hi, got {self.lr_range}")

    @property
    def free_classes(self) -> tuple[int, ...]:
        return tuple(c for c in self.classes if c not in self.pivots)

    @property
    def num_blocks(self) -> int:
        return -(-self.runs // self.block_runs)

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges) + 1

    @property
    def bin_cap(self) -> int:
        return max(1, math.ceil(self.bin_cap_frac * self.block_runs * self.ckpts_per_run))

    def spec(self) -> MLPSpec:
        return MLPSpec((784, *self.hidden, len(self.classes)))

    def replace(self, **kw) -> "CollectConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if self.holdout:
            d["holdout"] = [[list(c) for c in rule] for rule in self.holdout]
        else:
            del d["holdout"]   # the default is not written: manifests of older collections still match
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CollectConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in strict_fields(cls, d).items()})


HOLDOUT_SIDES = ("high", "low", "acc_high", "acc_low")   # loss >, loss <, acc >=, acc <=


def _normalise_holdout(holdout, classes) -> tuple:
    """Rules (any nesting of lists / tuples, e.g. from JSON) -> a tuple of rules, each a tuple of
    (int class label, side in HOLDOUT_SIDES, float threshold); refuses malformed rules by name."""
    if isinstance(holdout, (str, bytes)) or not isinstance(holdout, (list, tuple)):
        raise TypeError(f"holdout must be a sequence of rules, got {type(holdout).__name__}")
    rules = []
    for i, rule in enumerate(holdout):
        if isinstance(rule, (str, bytes)) or not isinstance(rule, (list, tuple)) or len(rule) == 0:
            raise ValueError(f"holdout rule {i} must be a non-empty sequence of (class, side, threshold) "
                             f"conditions, side one of {HOLDOUT_SIDES}, got {rule!r}")
        conds = []
        for cond in rule:
            if isinstance(cond, (str, bytes)) or not isinstance(cond, (list, tuple)) or len(cond) != 3:
                raise ValueError(f"holdout rule {i}: a condition is (class, side, threshold), got {cond!r}")
            c, side, thr = cond
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or int(c) not in classes:
                raise ValueError(f"holdout rule {i}: class {c!r} is not among classes {tuple(classes)}")
            if side not in HOLDOUT_SIDES:
                raise ValueError(f"holdout rule {i}: side must be one of {HOLDOUT_SIDES}, got {side!r}")
            if isinstance(thr, bool) or not isinstance(thr, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(float(thr)):
                raise ValueError(f"holdout rule {i}: threshold must be a finite number, got {thr!r}")
            conds.append((int(c), str(side), float(thr)))
        rules.append(tuple(conds))
    return tuple(rules)


def held_out_mask(rules, classes, class_loss, class_acc) -> np.ndarray:
    """(n, m) validation losses and accuracies (columns in `classes` order) -> (n,) bool: the row
    meets every condition of some holdout rule (`CollectConfig.holdout`; a collection never saves
    such a checkpoint). A loss condition holds when loss > t ("high") or loss < t ("low"), an
    accuracy condition when acc >= t ("acc_high") or acc <= t ("acc_low"). NaN metrics meet no
    condition. Losses are compared in float64 (exact for float32 losses) against the thresholds as
    given, so a float64 check of the stored values agrees even for a loss at the threshold.
    Accuracies are compared in float32, as stored: k/n and a threshold equal to k/n round to the
    same float32, so an accuracy exactly at the threshold counts."""
    classes = [int(c) for c in classes]
    loss = np.asarray(class_loss, dtype=np.float64)
    acc = np.asarray(class_acc, dtype=np.float32)
    out = np.zeros(len(loss), dtype=bool)
    for rule in _normalise_holdout(rules, classes):
        hit = np.ones(len(loss), dtype=bool)
        for c, side, thr in rule:
            j, sign = classes.index(c), (1.0 if side.endswith("high") else -1.0)
            if side.startswith("acc"):
                hit &= (acc[:, j] - np.float32(thr)) * np.float32(sign) >= 0
            else:
                hit &= (loss[:, j] - thr) * sign > 0
        out |= hit
    return out


PRESETS = {
    "mnist4": CollectConfig(),
    "mnist10": CollectConfig(classes=tuple(range(10)), pivots=(5, 6, 7, 8, 9), hidden=(7,),
                             ckpts_per_run=200, forget_max_classes=3),
}
PRESETS["mnist4-dihyfo2"] = PRESETS["mnist4"].replace(schedule="early_late")
PRESETS["mnist10-dihyfo2"] = PRESETS["mnist10"].replace(schedule="early_late")


def preset(name: str, **overrides) -> CollectConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def _csr_arrays(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (N, D) -> CSR arrays (crow (N+1,), col (nnz,), val (nnz,)) for the native ops."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = X.to_sparse_csr()
    return csr.crow_indices().contiguous(), csr.col_indices().contiguous(), csr.values().contiguous()


def block_seed(seed: int, block: int) -> int:
    """63-bit seed of block `block`, a pure function of (seed, block)."""
    return int(np.random.SeedSequence([int(seed), int(block)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def offer_probs(cfg: CollectConfig, total_steps: int) -> torch.Tensor:
    """(T,) probability that a run offers a checkpoint at step t = 1..T. Expected offers per run
    = offer_factor * ckpts_per_run. "early_late" (DiHyFo-2) puts more mass near both ends."""
    t = (torch.arange(1, total_steps + 1, dtype=torch.float64) - 0.5) / total_steps
    w = torch.ones_like(t) if cfg.schedule == "uniform" else 0.25 + 3.0 * (2 * t - 1) ** 2
    p = w / w.sum() * cfg.offer_factor * cfg.ckpts_per_run
    return p.clamp(max=1.0).float()


@dataclass
class BlockResult:
    """Saved checkpoints of one block, sorted by (run, step). params (n, P) float32,
    class_loss / class_acc (n, m) float32, run / step (n,) int64, phase (n,) int8."""

    block: int
    params: np.ndarray
    class_loss: np.ndarray
    class_acc: np.ndarray
    run: np.ndarray
    step: np.ndarray
    phase: np.ndarray
    run_info: dict = field(default_factory=dict)  # per-run lr, keep rates, forget step/classes
    stats: dict = field(default_factory=dict)


class BlockTrainer:
    """Trains runs [k*block_runs, ...) of a config as one batched computation.

    First-layer weights of all runs live in one transposed matrix `W1T` (Da, R*H) (W[0] is its
    (R, H, Da) view); its forward and SGD update on the shared minibatch are one sparse product
    each on the CPU (one GEMM each elsewhere). Later layers are per-run tensors W_l (R, out, in),
    b_l (R, out) with one torch.bmm per layer. The backward is written by hand (no autograd
    graph per step).
    """

    def __init__(self, cfg: CollectConfig, splits, block: int, device="cpu", sparse: bool | None = None):
        """sparse: first layer on CSR inputs (native CPU kernels); None = whenever available."""
        self.cfg, self.block, self.device = cfg, int(block), torch.device(device)
        self.spec = cfg.spec()
        if tuple(splits.classes) != tuple(cfg.classes):
            raise ValueError(f"splits hold classes {splits.classes} but the config wants {cfg.classes}")
        dev = self.device
        self.m = len(cfg.classes)
        self.pivot_idx = torch.tensor([cfg.classes.index(c) for c in cfg.pivots], device=dev, dtype=torch.long)
        self.free_idx = torch.tensor([cfg.classes.index(c) for c in cfg.free_classes], device=dev, dtype=torch.long)
        order = torch.argsort(splits.y_train, stable=True)                  # training data sorted by class
        self.Xtr = splits.X_train[order].to(dev)                            # (N, D)
        self.ytr = splits.y_train[order].to(dev)                            # (N,)
        counts = torch.bincount(self.ytr, minlength=self.m)
        self.class_count = counts.to(dev)                                   # (m,)
        vorder = torch.argsort(splits.y_val, stable=True)                   # validation sorted by class too:
        self.Xv, self.yv = splits.X_val[vorder].to(dev), splits.y_val[vorder].to(dev)  # the evaluator reads it in order
        self.val_count = torch.bincount(self.yv, minlength=self.m).float()  # (m,)
        self._edges_np = np.asarray(cfg.bin_edges, dtype=np.float32)        # (E,) as float32 losses compare
        self._free_np, self._pivot_np = self.free_idx.cpu().numpy(), self.pivot_idx.cpu().numpy()
        # Pixels that are 0 in every train and val image (the border) get zero gradient, so their
        # first-layer weights stay at init and add nothing to any logit: compute without them.
        self.active = ((self.Xtr != 0).any(0) | (self.Xv != 0).any(0)).nonzero().squeeze(1)  # (Da,)
        self.Xtr, self.Xv = self.Xtr[:, self.active].contiguous(), self.Xv[:, self.active].contiguous()
        self.eval_spec = MLPSpec((len(self.active), *self.spec.layer_sizes[1:]))
        self._sizes = list(self.eval_spec.layer_sizes)
        from ..ops.backends import native_has
        can = self.device.type == "cpu" and native_has("csr_linear", self.device)
        if sparse and not can:
            raise RuntimeError("sparse=True needs the CPU device and the native csr_linear kernel")
        self.sparse = can if sparse is None else bool(sparse)
        if self.sparse:   # CSR arrays of the training set, and the validation set as a CSR tensor
            self._csr_tr, self._csr_val = _csr_arrays(self.Xtr), _csr_arrays(self.Xv)
        first = block * cfg.block_runs
        self.R = min(cfg.block_runs, cfg.runs - first)
        if self.R <= 0:
            raise ValueError(f"block {block} is empty: config has {cfg.runs} runs in blocks of {cfg.block_runs}")
        self.run_ids = torch.arange(first, first + self.R)
        self.steps_per_epoch = -(-len(self.ytr) // cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(block_seed(cfg.seed, block))
        self._init_runs()
        self._perm = None

    def _rand(self, *shape):
        return torch.rand(*shape, generator=self.gen, device=self.device)

    def _init_runs(self):
        cfg, R, dev, m = self.cfg, self.R, self.device, self.m
        # PyTorch nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b.
        self.W, self.b = [], []
        for fan_in, fan_out in zip(self.spec.layer_sizes[:-1], self.spec.layer_sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            self.W.append((self._rand(R, fan_out, fan_in) * 2 - 1) * bound)
            self.b.append((self._rand(R, fan_out) * 2 - 1) * bound)
        self.W0_full = self.W[0]                                            # (R, H, 784) init, kept
        self.H = self.W0_full.shape[1]
        self.W1T = self.W0_full[:, :, self.active].reshape(R * self.H, -1).t().contiguous()  # (Da, R*H) trained
        self.W[0] = self.W1T.t().view(R, self.H, -1)                        # (R, H, Da) view of W1T
        self.b1 = self.b[0].view(-1)                                        # (R*H,) view of b[0]
        # Later layers packed into one (R, P_head) matrix (spec order) so a run's parameters are
        # three slices; W[l], b[l] (l >= 1) become views of it.
        self.head = torch.cat([t.flatten(1) for l in range(1, len(self.W)) for t in (self.W[l], self.b[l])], 1)
        off = 0
        for l in range(1, len(self.W)):
            o, i = self.W[l].shape[1:]
            self.W[l] = self.head[:, off:off + o * i].view(R, o, i)
            self.b[l] = self.head[:, off + o * i:off + o * i + o]
            off += o * i + o
        lo, hi = math.log(cfg.lr_range[0]), math.log(cfg.lr_range[1])
        self.lr = torch.exp(lo + (hi - lo) * self._rand(R))                 # (R,)
        free = torch.zeros(m, dtype=torch.bool, device=dev)
        free[self.free_idx] = True
        under = (self._rand(R, m) < cfg.undersample_prob) & free            # (R, m)
        k0, k1 = cfg.keep_range
        keep = torch.where(under, k0 + (k1 - k0) * self._rand(R, m), torch.ones(R, m, device=dev))
        self.keep = keep                                                    # (R, m) keep rates
        # Forgetting phase: a start step and a random nonempty set of free classes per run.
        has_forget = self._rand(R) < cfg.forget_prob
        f0, f1 = cfg.forget_at
        self.forget_step = torch.where(has_forget, (f0 + (f1 - f0) * self._rand(R)) * self.total_steps,
                                       torch.full((R,), float("inf"), device=dev)).ceil()
        nf = len(self.free_idx)
        kmax = max(1, min(cfg.forget_max_classes, nf))
        n_forget = 1 + (self._rand(R) * kmax).long().clamp(max=kmax - 1)    # (R,) in 1..kmax
        ranks = self._rand(R, nf).argsort(1).argsort(1)                     # random rank of each free class
        self.forget_mask = torch.zeros(R, m, dtype=torch.bool, device=dev)
        self.forget_mask[:, self.free_idx] = ranks < n_forget[:, None]
        self.forget_mask &= has_forget[:, None]
        self.class_w = self._class_weights(torch.zeros(R, dtype=torch.bool, device=dev))

    def _class_weights(self, forgetting: torch.Tensor) -> torch.Tensor:
        """(R, m) per-class loss weights: keep[r, c], and 0 for a class run r is forgetting now.
        Weighting example i by class_w[r, y_i] under uniform sampling is importance weighting for
        the sampling distribution p_r(i) ∝ keep[r, y_i] (with forgotten classes removed)."""
        return torch.where(forgetting[:, None] & self.forget_mask, torch.zeros_like(self.keep), self.keep)

    def flat_params(self, rows: torch.Tensor | None = None, full: bool = True) -> torch.Tensor:
        """(n, P) flat parameters (spec order: W_l row-major then b_l) of runs `rows` (all if None).
        full=False: first layer restricted to the active pixels, for eval_spec (cheaper scoring)."""
        if rows is None:
            rows = torch.arange(self.R, device=self.device)
        W0 = self.W[0][rows]                                                 # (n, H, Da)
        if full:
            W0, act = self.W0_full[rows], W0
            W0[:, :, self.active] = act                                      # (n, H, 784)
        return torch.cat([W0.flatten(1), self.b[0][rows], self.head[rows]], 1)

    def sample_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared minibatch of step `step` (1-based): (S,) training indices, the next slice of this
        epoch's random permutation, and (R, S) per-run loss weights normalised to sum 1 per run
        (all 0 for a run whose weights in this batch are all 0)."""
        B, e = self.cfg.batch_size, (step - 1) % self.steps_per_epoch
        if e == 0 or self._perm is None:
            self._perm = torch.randperm(len(self.ytr), generator=self.gen, device=self.device)
        idx = self._perm[e * B:(e + 1) * B]
        w = self.class_w[:, self.ytr[idx]]                                  # (R, S)
        return idx, w / w.sum(1, keepdim=True).clamp_min(1e-30)

    def sgd_step(self, idx: torch.Tensor, wn: torch.Tensor) -> None:
        """One SGD step of every run on the shared minibatch idx (S,) with normalised per-run loss
        weights wn (R, S): the weighted mean cross-entropy. Activations after the first layer are
        kept feature-major, (R, width, S), so per-class reductions run over contiguous rows."""
        R, H, S = self.R, self.H, len(idx)
        yb = self.ytr[idx]                                                   # (S,)
        if self.sparse:   # native: sparse first layer, then the later layers of every run in one op
            z1 = torch.ops.hyforget.csr_linear(*self._csr_tr, idx, self.W1T, self.b1)  # (S, R*H)
            G = torch.ops.hyforget.mlp_head_sgd_(z1, self.head, self.b[0], yb, wn, self.lr, self._sizes)
            torch.ops.hyforget.csr_linear_sub_grad_(*self._csr_tr, idx, G, self.W1T)  # W1T -= X_b^T G
            return
        # The same step in torch ops (the reference of mlp_head_sgd_; used off the CPU).
        z1 = torch.addmm(self.b1, self.Xtr[idx], self.W1T)                   # (S, R*H): one GEMM
        zs = [z1.t().view(R, H, S)]                                          # (R, H, S) view
        hs = [torch.relu(zs[0])]
        L = len(self.W)
        for l in range(1, L):
            z = torch.baddbmm(self.b[l][:, :, None], self.W[l], hs[-1])      # (R, out, S)
            zs.append(z)
            if l < L - 1:
                hs.append(torch.relu(z))
        z = zs[-1]
        g = (z - z.amax(1, keepdim=True)).exp_()
        g.div_(g.sum(1, keepdim=True))                                       # softmax over classes
        g[:, yb, torch.arange(S, device=g.device)] -= 1.0                    # dCE/dlogits per example
        g.mul_((wn * self.lr[:, None])[:, None, :])                          # fold weight and lr in once
        for l in range(L - 1, 0, -1):
            gW = torch.bmm(g, hs[l - 1].transpose(1, 2))                     # (R, out, in)
            gb = g.sum(2)                                                    # (R, out)
            g = torch.bmm(self.W[l].transpose(1, 2), g).mul_(zs[l - 1] > 0)  # (R, in, S) through ReLU
            self.W[l].sub_(gW)
            self.b[l].sub_(gb)
        G = g.view(R * H, S).t().contiguous()                                # (S, R*H), lr-scaled
        self.W1T.addmm_(self.Xtr[idx].t(), G, alpha=-1.0)                    # one GEMM
        self.b1.sub_(G.sum(0))

    def bin_cells(self, class_loss) -> np.ndarray:
        """(n, m) losses (array or CPU tensor) -> (n,) joint bin cell of the free classes' loss levels."""
        lev = np.searchsorted(self._edges_np, np.asarray(class_loss)[:, self._free_np], side="right")  # (n, f)
        return lev @ (self.cfg.num_bins ** np.arange(lev.shape[1]))

    def held_out(self, class_loss, class_acc) -> np.ndarray:
        """(n, m) validation losses and accuracies -> (n,) bool: the checkpoint meets every
        condition of some holdout rule of the config (so it must not be saved); `held_out_mask`."""
        return held_out_mask(self.cfg.holdout, self.cfg.classes, class_loss, class_acc)

    def score_exact(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class validation loss / accuracy (n, m) of runs `rows`, from one call of the fused
        evaluator on their parameters (first layer over the active pixels only). NaN rows for
        networks with a non-finite parameter (the rules then reject them).

        On the CPU the native op is called directly on the CSR validation set and the engine's
        own weight layout: the public wrapper's per-call checks cost ~0.35 ms and gathering flat
        parameter vectors ~0.15 ms, against ~0.6 ms for the fused evaluation of a step's ~16
        offers."""
        if self.sparse:   # straight from W1T / b1 / head: no flat parameter vectors
            loss_sum, corr_sum = torch.ops.hyforget.class_metrics_runs_csr(
                self.W1T, self.b[0], self.head, rows, *self._csr_val, self.yv, self._sizes, self.m)
            return loss_sum / self.val_count, corr_sum / self.val_count  # NaN rows: non-finite params
        from ..ops import functional as ops
        cm = ops.class_metrics(self.flat_params(rows, full=False), self.eval_spec, self.Xv, self.yv, self.m)
        return cm.class_loss, cm.class_acc

    def _score(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-class validation (loss, acc) of runs `rows` as host arrays (n, m)."""
        loss, acc = self.score_exact(torch.from_numpy(rows).to(self.device))
        return loss.cpu().numpy(), acc.cpu().numpy()

    def _acceptable(self, loss: np.ndarray, acc: np.ndarray) -> np.ndarray:
        """(n,) bool, the selection rules: every pivot class at accuracy >= gamma, every loss finite,
        no holdout rule met."""
        return ((acc[:, self._pivot_np] >= self.cfg.gamma).all(1) & np.isfinite(loss).all(1)
                & ~self.held_out(loss, acc))

    def _claim_bins(self, rows: np.ndarray, cell: np.ndarray, bin_count: np.ndarray) -> np.ndarray:
        """Bin caps, deterministic within a step: offers claim a cell's free slots in run order.
        -> (n,) bool, the offers that fit under cfg.bin_cap (bin_count is not changed)."""
        order = np.argsort(cell * self.R + rows, kind="stable")             # by (cell, run)
        cs = cell[order]
        rank = np.arange(len(cs)) - np.searchsorted(cs, cs)                  # position within its cell
        keep = np.empty(len(cs), dtype=bool)
        keep[order] = bin_count[cs] + rank < self.cfg.bin_cap
        return keep

    def _run_info(self) -> dict:
        """Per-run draws of the block: lr, keep rates, forget step and forgotten classes."""
        cfg = self.cfg
        return {"lr": self.lr.cpu().tolist(), "keep": self.keep.cpu().tolist(),
                "forget_step": [None if math.isinf(s) else int(s) for s in self.forget_step.cpu().tolist()],
                "forget_classes": [[cfg.classes[c] for c in np.flatnonzero(r)] for r in self.forget_mask.cpu().numpy()]}

    def run(self, progress=None) -> BlockResult:
        """Train the block to the end (or until every run is full) -> its saved checkpoints.
        The per-step rules run on the host in numpy: they touch a few dozen numbers, where each
        torch op would cost more in dispatch than in work."""
        cfg, R, dev = self.cfg, self.R, self.device
        slots = _RunSlots(R, cfg.ckpts_per_run + 1, self.spec.num_params, self.m)
        all_rows = np.arange(R)
        loss0, acc0 = self._score(all_rows)
        init_ok = ~self.held_out(loss0, acc0)                                # (R,) initial params kept
        slots.record(all_rows[init_ok], self.flat_params(torch.from_numpy(all_rows[init_ok]).to(dev)),
                     loss0[init_ok], acc0[init_ok], 0, np.full(init_ok.sum(), PHASE_INIT))
        n_init = init_ok.astype(np.int64)                                    # slot 0 holds the init, if kept
        bin_count = np.zeros(cfg.num_bins ** len(self._free_np), dtype=np.int64)
        forgetting = np.zeros(R, dtype=bool)
        forget_step = self.forget_step.cpu().numpy()
        # Steps at which some run's forgetting phase begins (forget_step is integral or inf).
        forget_starts = {max(1, int(s)) for s in forget_step.tolist() if math.isfinite(s)}
        p_offer = offer_probs(cfg, self.total_steps).numpy()
        u_offer = self._rand(self.total_steps, R).cpu().numpy()            # (T, R) offer draws
        n_offers = 0
        for step in range(1, self.total_steps + 1):
            if step in forget_starts:                                        # a run starts forgetting
                forgetting = forget_step <= step
                self.class_w = self._class_weights(torch.from_numpy(forgetting).to(dev))
            idx, wn = self.sample_batch(step)
            self.sgd_step(idx, wn)
            saved = slots.count - n_init
            rows = np.flatnonzero((u_offer[step - 1] < p_offer[step - 1]) & (saved < cfg.ckpts_per_run))
            if len(rows) == 0:
                if (saved >= cfg.ckpts_per_run).all():
                    break  # every run is full: training further could save nothing
                continue
            n_offers += len(rows)
            loss, acc = self._score(rows)
            ok = self._acceptable(loss, acc)
            rows, loss, acc = rows[ok], loss[ok], acc[ok]
            if len(rows) == 0:
                continue
            cell = self.bin_cells(loss)
            keep = self._claim_bins(rows, cell, bin_count)
            if not keep.any():
                continue
            rows, loss, acc, cell = rows[keep], loss[keep], acc[keep], cell[keep]
            np.add.at(bin_count, cell, 1)
            slots.record(rows, self.flat_params(torch.from_numpy(rows).to(dev)), loss, acc, step,
                         np.where(forgetting[rows], PHASE_FORGET, PHASE_TRAIN))
            if progress is not None:
                progress(len(rows))
        out = slots.compact()
        stats = {"runs": R, "steps": step, "offers": n_offers, "scored": n_offers + R,
                 "saved": int((slots.count - n_init).sum()), "full_bins": int((bin_count >= cfg.bin_cap).sum())}
        return BlockResult(self.block, out["params"], out["loss"], out["acc"],
                           np.repeat(self.run_ids.numpy(), slots.count), out["step"], out["phase"],
                           self._run_info(), stats)


class _RunSlots:
    """Host buffers of a block's saved checkpoints. A checkpoint of run r goes straight to slot
    count[r] of r (at most `slots` each, arriving in step order), so the block comes out sorted by
    (run, step) after an in-place compaction (mnist10: ~420 MB of parameters per block; a second
    array that size cost ~1 s of first-touch page faults on the development VM)."""

    def __init__(self, runs: int, slots: int, num_params: int, m: int):
        self.R, self.slots, self.P = runs, slots, num_params
        self.buf = {"params": np.empty((runs, slots, num_params), np.float32),
                    "loss": np.empty((runs, slots, m), np.float32), "acc": np.empty((runs, slots, m), np.float32),
                    "step": np.empty((runs, slots), np.int64), "phase": np.empty((runs, slots), np.int8)}
        self.count = np.zeros(runs, dtype=np.int64)

    def record(self, rows: np.ndarray, params: torch.Tensor, loss, acc, step, phase) -> None:
        k = self.count[rows]
        self.buf["params"][rows, k] = params.cpu().numpy()
        self.buf["loss"][rows, k], self.buf["acc"][rows, k] = loss, acc
        self.buf["step"][rows, k], self.buf["phase"][rows, k] = step, phase
        self.count[rows] += 1

    def compact(self) -> dict:
        """-> {params, loss, acc, step, phase} of the used slots, sorted by (run, step); params is a
        view of the buffer compacted in place."""
        R, slots, P = self.R, self.slots, self.P
        filled = np.flatnonzero((np.arange(slots) < self.count[:, None]).ravel())  # (n,) used slots
        out = {k: v.reshape(R * slots, *v.shape[2:])[filled] for k, v in self.buf.items() if k != "params"}
        flat = self.buf["params"].reshape(R * slots, P)
        for i in range(0, len(filled), 1024):   # compact in place: filled[i] >= i, so sources are intact
            src = filled[i:i + 1024]
            flat[i:i + len(src)] = flat[src]
        out["params"] = flat[:len(filled)]
        return out

def collect_block(cfg: CollectConfig, splits, block: int, device="cpu", progress=None) -> BlockResult:
    """Train and score block `block` of `cfg`; a pure function of (cfg, splits, block, device)."""
    return BlockTrainer(cfg, splits, block, device).run(progress)


# ----------------------------------------------------------------------------- driver
def manifest_meta(cfg: CollectConfig, splits) -> dict:
    from .. import __version__
    return {"spec": {"layer_sizes": list(cfg.spec().layer_sizes)}, "classes": list(cfg.classes),
            "pivots": list(cfg.pivots), "split": splits.describe(), "split_seed": cfg.split_seed,
            "config": cfg.to_dict(), "package_version": __version__,
            "phases": {str(k): v for k, v in PHASE_NAMES.items()}}


def _sans_root(meta: dict) -> dict:
    """A collection record without where its IDX files lay (data_sha256 still ties it to the data)."""
    sp = {k: v for k, v in meta.get("split", {}).items() if k not in ("root", "files")}
    return {**meta, "split": sp}


def collect(cfg: CollectConfig, out: str, device="cpu", splits=None, log=print, rank=None, world=None,
            mnist_root: str | None = None) -> dict | None:
    """Collect `cfg` into folder `out`, resuming whatever finished shards it already holds.

    Data: `splits` if given; else full MNIST from the IDX files under `mnist_root` (torchvision's
    layout ROOT/MNIST/raw, or ROOT itself; see data.find_mnist_files); else the bundled digits.
    The split, with its source, root and data_sha256, is recorded in the manifest, from which
    data.splits_from_manifest rebuilds it. A resume may find the same files at another root.

    With WORLD_SIZE > 1 (torchrun) this process does blocks k ≡ rank (mod world); rank 0 writes
    the manifest after a barrier. -> the manifest (rank 0) or None (other ranks).
    """
    import json
    import os
    import time

    from . import store
    from .data import load_digits
    if rank is None:   # torchrun: this rank's device (cuda:LOCAL_RANK) and the process group
        rank, world, device, _ = dist_setup(device)
    if splits is not None and mnist_root is not None:
        raise ValueError("collect takes splits= or mnist_root=, not both")
    if splits is None:
        splits = load_digits(cfg.classes, cfg.split_seed, fractions=cfg.fractions,
                             **({"source": "torchvision", "root": mnist_root} if mnist_root is not None else {}))
    meta = manifest_meta(cfg, splits)
    os.makedirs(out, exist_ok=True)
    cpath = os.path.join(out, "collection.json")
    if rank == 0:
        if os.path.exists(cpath):
            with open(cpath) as f:
                old = json.load(f)
            if _sans_root(old) != _sans_root(json.loads(json.dumps(meta, sort_keys=True))):
                raise ValueError(f"{out} holds a collection with a different config or split; "
                                 f"use a new --out folder (differs in {sorted(k for k in meta if old.get(k) != json.loads(json.dumps(meta[k])))})")
        store.write_json_atomic(cpath, meta)
        store.clean_partial(out)
    barrier(world)
    done = store.finished_blocks(out)
    mine = [k for k in range(cfg.num_blocks) if k % world == rank]
    todo = [k for k in mine if k not in done]
    log(f"[rank {rank}/{world}] {cfg.num_blocks} blocks of {cfg.block_runs} runs; {len(mine) - len(todo)} "
        f"of my {len(mine)} already done, resuming {len(todo)}")
    t0, n_ck, n_runs = time.perf_counter(), 0, 0
    # Live bar of saved checkpoints inside blocks on a terminal (tqdm is silent when stderr is
    # not a tty); the per-block log line below is the record in CI logs and files.
    from tqdm import tqdm
    bar = tqdm(total=len(todo) * cfg.block_runs * cfg.ckpts_per_run, unit="ckpt", desc=f"rank {rank}",
               disable=not sys.stderr.isatty(), leave=False, smoothing=0.1)
    for i, k in enumerate(todo):
        res = collect_block(cfg, splits, k, device, progress=bar.update)
        store.write_shard(out, k, {"params": res.params, "class_loss": res.class_loss, "class_acc": res.class_acc,
                                   "run": res.run, "step": res.step, "phase": res.phase},
                          info={"runs": res.run_info, "stats": res.stats})
        n_ck += len(res.run)
        n_runs += res.stats["runs"]
        dt = time.perf_counter() - t0
        log(f"[rank {rank}] block {k} ({i + 1}/{len(todo)}): runs {n_runs}, checkpoints {n_ck}, "
            f"{n_ck / dt:.0f} ckpts/s, {n_runs / dt:.1f} runs/s")
    bar.close()
    barrier(world)
    manifest = None
    if rank == 0:
        manifest = store.write_manifest(out, meta, cfg.num_blocks)
        log(f"[rank 0] manifest: {manifest['num_checkpoints']} checkpoints in {cfg.num_blocks} shards -> {out}")
    barrier(world)
    return manifest

