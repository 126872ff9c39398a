"""Training loop of DiHyFo-1 / DiHyFo-2 on a collected checkpoint dataset.

Data path, all on the model's device: the dataset arrays are copied there once
(PairDataset.to); a step draws a GLOBAL batch of indices, permutations, diffusion times and
noise from one torch.Generator, so that every DDP rank draws the same numbers and takes its
slice (a 2-process run follows the 1-process loss curve). Params are permuted, normalized and
tokenized by the fused `tokenize` op; θ and θ* of a pair share one permutation.

Checkpoints (rank 0 only, atomic tmp + os.replace, no pickle; the format lives in checkpoint.py):
  out/checkpoint.safetensors   model.*, ema.*, opt.* (AdamW state flattened to tensors),
                               rng.* (generator states as uint8); its metadata holds the JSON config
  out/config.json              the same config, readable: HypernetConfig, TrainConfig, diffusion,
                               ParamNorm stats, dataset identity (manifest hash; its path relative
                               to out/), held-out runs, loss ranges, step
  out/curves.json              [{step, loss, lr, grad_norm, eval?}], out/tb/ TensorBoard scalars
Resuming loads all of it and continues bit-for-bit (the test compares 2N straight vs N + N);
resumed_config is the one merge of a saved run's configuration with what a resume asks for.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..collection.pairs import MOVED_DIRECTIONS, PairDataset
from ..collection.store import CheckpointStore, write_json_atomic
from ..ops import reference as _ref
from ..ops.functional import canonical_perms, class_losses, sample_perms, tokenize
from ..ops.spec import MLPSpec, ParamNorm
from ..dist import dist_setup
from .api import Hypernet
from .checkpoint import (CKPT, CONFIG, CURVES, FORMAT, check_dataset_matches, check_same_dataset,  # noqa: F401
                         dataset_identity, read_checkpoint, save_safetensors_atomic)
from .diffusion import GaussianDiffusion
from .evaluate import evaluate_hypernet
from .models import LOG_EPS, PRESETS, DiHyFo, HypernetConfig
from ..configs import strict_fields

# Optimisation defaults per model preset. G.pt's EMA 0.9999 averages over ~10^4 steps; a short
# CPU `tiny` run has a few thousand steps, so its EMA horizon is ~200 steps (0.995).
TRAIN_PRESETS = {
    "tiny": dict(lr=4e-4, batch_size=64, warmup_steps=200, ema_decay=0.995, unit_order="canonical"),
    "paper": dict(lr=4e-4, batch_size=256, warmup_steps=1000, ema_decay=0.9999, unit_order="random"),
}
LOSS_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
UNIT_ORDERS = ("random", "canonical")
LOSS_MATCH_TARGETS = ("prompt", "own")   # TrainConfig.loss_match_target
LOSS_MATCH_SPLITS = ("train", "val")     # TrainConfig.loss_match_split


@dataclass
class TrainConfig:
    """Every knob of a training run (JSON-able). None = the preset's value (TRAIN_PRESETS)."""

    model: str = "dihyfo2"             # "dihyfo1" (pairs θ -> θ*) or "dihyfo2" (single checkpoints)
    preset: str = "tiny"               # architecture + optimisation preset
    steps: int = 20_000                # length of the cosine schedule (and of the run)
    batch_size: int | None = None      # GLOBAL batch, split over DDP ranks
    lr: float | None = None
    weight_decay: float = 0.1          # not on biases, LayerNorms, positional embedding
    grad_clip: float = 0.75
    warmup_steps: int | None = None    # linear warm-up, then cosine to 0 at `steps`
    ema_decay: float | None = None     # effective decay min(ema_decay, (1 + s) / (10 + s))
    heldout_frac: float = 0.1          # fraction of whole runs kept out for evaluation
    seed: int = 0                      # init, held-out split, norm sample, every batch
    norm_samples: int = 20_000         # training checkpoints the ParamNorm is fitted on
    diffusion_steps: int = 1000
    ckpt_every: int = 500
    log_every: int = 50
    eval_every: int = 0                # 0 = no evaluation during training
    eval_prompts: int = 20
    eval_per_prompt: int = 8
    eval_steps: int = 20
    eval_max_items: int | None = None
    minutes: float | None = None       # stop (with a checkpoint) after this wall-clock budget
    loss_weighting: str = "piece"      # "piece": every weight / bias piece counts equally; "value": every value
    pair_change_bias: float = 0.0      # DiHyFo-1: > 0 draws pairs whose losses move more often (pairs.py)
    pair_moved_share: float = 0.0      # DiHyFo-1: this share of each batch moves some class loss by > 1 (pairs.py)
    pair_moved_direction: str = "any"  # ... "any": up or down; "up": some class loss rises by > 1 (de-optimisation)
    unit_order: str | None = None      # "random": a fresh hidden-unit permutation per sample (augmentation);
                                       # "canonical": ops.canonical_perms (units by incoming-weight norm;
                                       # DiHyFo-1: θ's order for θ and θ*). None = the preset's; configs
                                       # saved before the field existed load as "random"
    loss_match: float = 0.0            # > 0: + this x the loss-matching term (bench/RESULTS.md §4, §15): per-class CE of the
                                       # predicted x̂0 on images of loss_match_split vs the target losses (log
                                       # space), each sample weighted by its signal share ᾱ_t (low noise)
    loss_match_images: int = 256       # images drawn per step for that term
    loss_match_target: str = "prompt"  # what the term matches the predicted network's losses to: "prompt", the
                                       # losses it is conditioned on; "own", the clean network x0's own
                                       # losses on the same images
    loss_match_split: str = "train"    # the images it reads: "train", or "val", the split the conditioning
                                       # losses were measured on (a trained network's training loss sits
                                       # below its validation loss, so "prompt" on "train" asks for
                                       # networks that fit their training data less)
    balance: float = 0.0               # DiHyFo-2: > 0 draws checkpoints with rare class losses more often,
                                       # weight (1 / share of the rarest loss bin) ** balance (pairs.py)
    overrides: dict = field(default_factory=dict)   # HypernetConfig fields (width, depth, ...)

    def __post_init__(self):
        if self.model not in ("dihyfo1", "dihyfo2"):
            raise ValueError(f"model must be 'dihyfo1' or 'dihyfo2', got {self.model!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        for k, v in TRAIN_PRESETS[self.preset].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "diffusion_steps", "norm_samples"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise ValueError("warmup_steps and eval_every must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.heldout_frac < 1:
            raise ValueError(f"heldout_frac must be in [0, 1), got {self.heldout_frac}")
        if self.loss_match < 0 or self.loss_match_images <= 0:
            raise ValueError(f"need loss_match >= 0 and loss_match_images > 0, got {self.loss_match}, "
                             f"{self.loss_match_images}")
        if self.loss_match_target not in LOSS_MATCH_TARGETS:
            raise ValueError(f"loss_match_target must be one of {LOSS_MATCH_TARGETS}, got {self.loss_match_target!r}")
        if self.loss_match_split not in LOSS_MATCH_SPLITS:
            raise ValueError(f"loss_match_split must be one of {LOSS_MATCH_SPLITS}, got {self.loss_match_split!r}")
        if self.pair_change_bias > 0 and self.pair_moved_share > 0:
            raise ValueError("pair_change_bias and pair_moved_share are two ways to favour moving pairs; use one")
        if not 0 <= self.pair_moved_share <= 1:
            raise ValueError(f"pair_moved_share must be in [0, 1], got {self.pair_moved_share}")
        if self.pair_moved_direction not in MOVED_DIRECTIONS:
            raise ValueError(f"pair_moved_direction must be one of {MOVED_DIRECTIONS}, got {self.pair_moved_direction!r}")
        if not 0 <= self.balance <= 1:
            raise ValueError(f"balance must be in [0, 1], got {self.balance}")
        if self.balance > 0 and self.model != "dihyfo2":
            raise ValueError("balance weights single checkpoints (DiHyFo-2); DiHyFo-1's pairs use pair_moved_share")
        if self.unit_order not in UNIT_ORDERS:
            raise ValueError(f"unit_order must be one of {UNIT_ORDERS}, got {self.unit_order!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = {"unit_order": "random", **d}    # saved before unit_order existed: random permutations
        return cls(**strict_fields(cls, d))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup_steps) / span)))


# ---------------------------------------------------------------------------- dataset facts
def split_runs(run_ids: np.ndarray, frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Whole runs -> (training runs, held-out runs), a seeded shuffle; >= 1 held out when frac > 0.
    Held-out runs are drawn among runs with >= 2 checkpoints, so DiHyFo-1 can evaluate on pairs."""
    runs, count = np.unique(run_ids, return_counts=True)
    eligible = runs[count >= 2]
    n_held = 0 if frac <= 0 or len(runs) < 2 else max(1, int(round(frac * len(runs))))
    n_held = min(n_held, len(eligible), len(runs) - 1)
    perm = np.random.default_rng([seed, 0x5EED]).permutation(len(eligible))
    held = np.sort(eligible[perm[:n_held]])
    train = runs[~np.isin(runs, held)]
    return train.tolist(), held.tolist()


def loss_ranges(class_loss: np.ndarray, classes) -> dict:
    """Per class label: min / max / quantiles of the training checkpoints' losses (prompt ranges)."""
    out = {}
    for c, col in zip(classes, class_loss.T):
        col = col[np.isfinite(col)].astype(np.float64)
        out[str(c)] = {"min": float(col.min()), "max": float(col.max()), "mean": float(col.mean()),
                       "quantiles": {str(q): float(v)
                                     for q, v in zip(LOSS_QUANTILES, np.quantile(col, LOSS_QUANTILES))}}
    return out


def log_loss_stats(class_loss: np.ndarray) -> dict:
    """Mean and std of log(L + LOG_EPS) over the finite training class losses, pooled over classes
    (the standardisation of target_repr "log", stored in the HypernetConfig)."""
    x = np.log(np.clip(class_loss[np.isfinite(class_loss)].astype(np.float64), 0, None) + LOG_EPS)
    return {"target_log_mean": float(x.mean()), "target_log_std": float(max(x.std(), 1e-6))}


def loss_weight(layout, how: str, mask: torch.Tensor) -> torch.Tensor:
    """(T, C) weight of each token value in the MSE. "value": 1 per real value (G.pt). "piece":
    1 / size of its piece, so each layer's weight and bias count equally: in a 784-2-4 MLP the
    first layer holds 99% of the values, while the output layer decides most per-class losses."""
    if how == "value":
        return mask
    if how != "piece":
        raise ValueError(f"loss_weighting must be 'piece' or 'value', got {how!r}")
    # piece of every token value (either layout kind: neuron tokens mix pieces), -1 = padding
    sizes = [r * c for _, _, r, c in layout.spec.pieces]
    per_piece = torch.tensor([1.0 / n for n in sizes], device=mask.device)
    per_val = per_piece[layout.piece_map().to(mask.device).clamp(min=0)]          # (T, C)
    return mask * per_val * (mask.sum() / len(sizes))    # mean weight 1 over real values


# ---------------------------------------------------------------------------- model parts
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices; none on biases (incl. per-token bias tables), LayerNorm
    weights (1-D) and the positional embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.endswith("bias") or p.ndim < 2 or name == "pos" or name.endswith(".pos"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """EMA warm-up: early averages do not drag in the random initialisation for ~1/(1-d) steps."""
    return min(cfg.ema_decay, (1.0 + step) / (10.0 + step))


def _opt_flatten(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state -> ({"opt.<param idx>.<key>": tensor}, JSON-able param_groups)."""
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items()
               for k, v in st.items()}
    return tensors, sd["param_groups"]


def _opt_unflatten(tensors: dict, groups: list) -> dict:
    state: dict = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    return {"state": state, "param_groups": groups}


def _strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------- one step
class _Step:
    """One step's data and loss. Every random number comes from `gen` in a fixed order, for the
    GLOBAL batch; this rank keeps rows [lo, hi)."""

    def __init__(self, cfg: TrainConfig, model: DiHyFo, diffusion: GaussianDiffusion, ds: PairDataset,
                 norm: ParamNorm, lo: int, hi: int, images: tuple | None = None):
        self.cfg, self.model, self.diffusion, self.ds, self.norm = cfg, model, diffusion, ds, norm
        self.images = images                     # (X, y) of cfg.loss_match_split on the device, for cfg.loss_match
        if cfg.loss_match > 0 and images is None:
            raise ValueError("loss_match > 0 needs the images of its split (loss_match_split)")
        self.lo, self.hi = lo, hi
        self.spec = model.cfg.spec
        self.layout = model.layout
        self.weight = loss_weight(self.layout, cfg.loss_weighting, model.token_mask)   # (T, C)

    def loss(self, fwd, gen: torch.Generator) -> torch.Tensor:
        B, lo, hi = self.cfg.batch_size, self.lo, self.hi
        pair = self.model.conditional_on_theta
        part = slice(lo, hi)                                                     # this rank's rows
        batch = self.ds.sample_batch(B, gen, change_bias=self.cfg.pair_change_bias, part=part,
                                       moved_share=self.cfg.pair_moved_share,
                                       moved_direction=self.cfg.pair_moved_direction) if pair else \
            self.ds.sample_checkpoints(B, gen, part=part)
        perms = sample_perms(self.spec, B, generator=gen)[lo:hi]                 # (b, H) one per pair
        if self.cfg.unit_order == "canonical":   # same draws as "random", so both follow one stream
            perms = canonical_perms(batch["theta"] if pair else batch["params"], self.spec)
        if self.layout.kind == "neuron":   # an equivariant model (models.py): unit order changes nothing
            perms = None
        t = self.diffusion.sample_t(B, gen)[lo:hi]                               # (b,)
        mask = self.model.token_mask                                             # (T, C)
        noise = torch.randn((B, *mask.shape), generator=gen, device=mask.device)[lo:hi] * mask
        p_drop = self.model.cfg.cond_dropout
        drop = (torch.rand(B, generator=gen, device=mask.device) < p_drop)[lo:hi] if p_drop > 0 else None
        if pair:
            x0 = tokenize(batch["theta_star"], self.layout, perms, self.norm, validate=False)
            theta = tokenize(batch["theta"], self.layout, perms, self.norm, validate=False)
            target, cur = batch["loss_star"], batch["loss"]

            def model_fn(x_t, tt):
                return fwd(x_t, tt, target, theta, cur, drop)
        else:
            x0 = tokenize(batch["params"], self.layout, perms, self.norm, validate=False)
            target = batch["loss"]

            def model_fn(x_t, tt):
                return fwd(x_t, tt, target, drop_target=drop)
        if self.cfg.loss_match <= 0:
            return self.diffusion.training_loss(model_fn, x0, mask, t=t, noise=noise, weight=self.weight)
        mse, pred = self.diffusion.training_loss(model_fn, x0, mask, t=t, noise=noise, weight=self.weight,
                                                 return_pred=True)
        clean = batch["theta_star"] if pair else batch["params"]                         # (b, P) x0, unpermuted
        return mse + self.cfg.loss_match * self.match_loss(pred, target, t, gen, clean)

    def match_loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, gen,
                   clean: torch.Tensor) -> torch.Tensor:
        """Loss matching: per-class CE of the predicted networks x̂0 (in their permuted order, the
        same function) on a batch of the images of cfg.loss_match_split, in log space, weighted by
        ᾱ_t, against `target` (the conditioning losses, measured on the validation split) or, with
        loss_match_target "own", against the clean networks' (`clean`, (b, P)) CE on the same images.
        Its images are drawn after every other number of the step."""
        X, y = self.images
        idx = torch.randint(0, X.shape[0], (self.cfg.loss_match_images,), generator=gen, device=gen.device)
        idx = idx.to(X.device)
        Xb, yb = X[idx], y[idx]                                                          # (n, D), (n,) once for both
        params = _ref.detokenize(pred * self.model.token_mask, self.layout, self.norm)   # (b, P), differentiable
        L = class_losses(params, self.spec, Xb, yb)                                      # (b, m)
        if self.cfg.loss_match_target == "own":
            with torch.no_grad():
                target = class_losses(clean.float(), self.spec, Xb, yb)                  # (b, m)
        err = ((L + LOG_EPS).log() - (target.float().clamp(min=0) + LOG_EPS).log()) ** 2
        ok = torch.isfinite(err)
        w = self.diffusion.alphas_cumprod[t][:, None].expand_as(err)                    # (b, m)
        return (w * torch.where(ok, err, torch.zeros_like(err))).sum() / ok.sum().clamp(min=1)


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _flatten_scalars(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten_scalars(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (int, float, np.floating, np.integer)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


# ---------------------------------------------------------------------------- resuming
RESUMABLE = ("steps", "minutes", "eval_every", "ckpt_every", "log_every")   # may change when a run resumes


def resumed_config(saved: dict, given: dict | None = None, where: str = "the saved run", name=str) -> TrainConfig:
    """The TrainConfig a resumed run continues with: the saved run's (`saved`: its config dict),
    with the RESUMABLE fields of `given` (TrainConfig field -> value) taken from `given`.

    Any other field in `given` must equal the saved value ("overrides": {HypernetConfig field:
    value}, compared with the saved model's): a change (another preset, lr, width, ...) is refused
    with a ValueError naming each such field as `name(field)` (the CLI passes its flag names).
    """
    old = TrainConfig.from_dict(saved["train"])
    given = given or {}
    if "model" in given and given["model"] != old.model:
        raise ValueError(f"{where} holds a {old.model} run; cannot resume it as {given['model']}")
    arch = {"tokens": "layer", **saved.get("model", {})}   # layer-wise configs are saved without `tokens`
    changed = []
    for k, v in given.items():
        if k in RESUMABLE or k == "model":
            continue
        if k == "overrides":
            for f, x in v.items():
                was = arch.get(f, old.overrides.get(f))
                if was != x:
                    changed.append(f"{name(f)} (saved {was!r}, given {x!r})")
        elif getattr(old, k) != v:
            changed.append(f"{name(k)} (saved {getattr(old, k)!r}, given {v!r})")
    if changed:
        raise ValueError(f"resuming {where} continues it exactly as it was trained, but "
                         f"{'; '.join(changed)} would change it. Only {', '.join(name(k) for k in RESUMABLE)} "
                         "may change on resume; train a new run into another folder instead")
    return dataclasses.replace(old, **{k: given[k] for k in RESUMABLE if k in given})


def _open_run(cfg: TrainConfig | None, store: CheckpointStore, out_dir: str, resume: bool):
    """A fresh run or a resumed one -> (cfg, hcfg, saved tensors, saved config). Resuming reads the
    checkpoint, merges the configuration (resumed_config) and checks that the dataset is the one
    the run was trained on (same spec, same manifest hash)."""
    if resume:
        tensors, saved = read_checkpoint(out_dir, device="cpu")
        cfg = resumed_config(saved, None if cfg is None else cfg.to_dict(), out_dir)
        hcfg = HypernetConfig.from_dict(saved["model"])
        check_dataset_matches(hcfg, store)
        check_same_dataset(saved["dataset"], store.root, f"the run in {out_dir}")
        return cfg, hcfg, tensors, saved
    if cfg is None:
        raise ValueError("a new run needs a TrainConfig (cfg=None only resumes a saved run)")
    if os.path.exists(os.path.join(out_dir, CKPT)):
        raise ValueError(f"{out_dir} already holds a trained hypernetwork; resume it (--resume) or use a "
                         "new output folder")
    hcfg = HypernetConfig.preset(cfg.model, MLPSpec(store.layer_sizes), cfg.preset, **cfg.overrides)
    return cfg, hcfg, None, None


# ---------------------------------------------------------------------------- run parts
@dataclass
class _Data:
    """A run's data: held-out runs, the training runs' checkpoints on the device, ParamNorm, loss ranges."""
    hcfg: HypernetConfig
    train_runs: list
    held: list
    ds: PairDataset
    norm: ParamNorm
    ranges: dict


def _prepare_data(cfg: TrainConfig, hcfg: HypernetConfig, store: CheckpointStore, saved: dict | None,
                  device) -> _Data:
    """Held-out whole runs; the training runs' checkpoints fit the norm and give the loss ranges
    (a resumed run reads them back from its config)."""
    run_ids = store.load("run")
    if saved is not None:
        held = saved["heldout_runs"]
        train_runs = sorted(set(np.unique(run_ids).tolist()) - set(held))
    else:
        train_runs, held = split_runs(run_ids, cfg.heldout_frac, cfg.seed)
    ds = PairDataset(store, runs=train_runs).to(device).balance(cfg.balance)
    if saved is not None:
        norm = ParamNorm(hcfg.spec, torch.tensor(saved["norm"]["stats"]))
        ranges = saved["loss_ranges"]
    else:
        rng = np.random.default_rng([cfg.seed, 0x40A])
        rows = ds.rows if len(ds.rows) <= cfg.norm_samples else \
            np.sort(rng.choice(ds.rows, cfg.norm_samples, replace=False))
        norm = ParamNorm.fit(ds.take("params", rows), hcfg.spec)
        ranges = loss_ranges(ds.take("class_loss", ds.rows).cpu().numpy(), store.classes)
        if hcfg.target_repr == "log" and "target_log_mean" not in cfg.overrides:
            hcfg = dataclasses.replace(hcfg, **log_loss_stats(ds.take("class_loss", ds.rows).cpu().numpy()))
    return _Data(hcfg, train_runs, held, ds, norm.to(device), ranges)


@dataclass
class _State:
    """What the optimisation changes and a checkpoint holds."""
    model: DiHyFo
    ema: DiHyFo
    opt: torch.optim.Optimizer
    gen: torch.Generator
    step: int = 0
    wall: float = 0.0

    def tensors(self) -> tuple[dict, list]:
        """-> (checkpoint tensors model.* ema.* opt.* rng.batch, the optimizer's JSON param groups)."""
        opt_t, groups = _opt_flatten(self.opt)
        return {**{f"model.{k}": v for k, v in self.model.state_dict().items()},
                **{f"ema.{k}": v for k, v in self.ema.state_dict().items()}, **opt_t,
                "rng.batch": self.gen.get_state()}, groups


def _build_state(cfg: TrainConfig, hcfg: HypernetConfig, device, tensors: dict | None, saved: dict | None) -> _State:
    """Model, EMA copy, AdamW and the batch generator: seeded (identical on every rank), then, when
    resuming, loaded from the checkpoint."""
    torch.manual_seed(cfg.seed)  # the initialisation (identical on every rank)
    model = DiHyFo(hcfg, cfg.diffusion_steps).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    st = _State(model, ema, opt, gen)
    if saved is not None:
        model.load_state_dict(_strip(tensors, "model."))
        ema.load_state_dict(_strip(tensors, "ema."))
        # on the CPU: load_state_dict moves moments to the params' device and keeps AdamW's
        # `step` counters on the CPU, where the non-capturable implementation wants them
        opt.load_state_dict(_opt_unflatten({k: v for k, v in tensors.items() if k.startswith("opt.")},
                                           saved["opt_groups"]))
        gen.set_state(tensors["rng.batch"])
        st.step, st.wall = int(saved["step"]), float(saved["wall_time_s"])
    return st


def _run_meta(cfg: TrainConfig, data: _Data, diffusion: GaussianDiffusion, store: CheckpointStore, out_dir: str,
              world: int, device) -> dict:
    """The config saved with every checkpoint (config.json). The dataset is recorded by its
    identity and its path relative to out_dir (checkpoint.dataset_identity)."""
    hcfg = data.hcfg
    ident = dataset_identity(store, run_dir=out_dir)
    return {"format": FORMAT, "model": hcfg.to_dict(), "train": cfg.to_dict(), "diffusion": diffusion.to_dict(),
            "norm": {"layer_sizes": list(hcfg.layer_sizes), "stats": data.norm.stats.cpu().tolist()},
            "dataset": ident, "data_dir": ident["dir"], "classes": list(store.classes), "pivots": ident["pivots"],
            "heldout_runs": [int(r) for r in data.held], "train_runs": len(data.train_runs),
            "loss_ranges": data.ranges, "world_size": world, "device": str(device)}


class _Record:
    """Rank 0's record of a run in out_dir: checkpoints (with config.json, atomic), curves.json and
    TensorBoard scalars. On the other ranks (on=False) every method does nothing."""

    def __init__(self, out_dir: str, meta: dict, on: bool, resume: bool, step: int):
        self.out_dir, self.meta, self.on = out_dir, meta, on
        self.curves_path = os.path.join(out_dir, CURVES)
        self.curves, self.writer = [], None
        if not on:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume and os.path.exists(self.curves_path):
            with open(self.curves_path) as f:
                self.curves = [c for c in json.load(f) if c["step"] <= step]   # drop rows past the checkpoint
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=step if resume else None)

    def save(self, st: _State) -> None:
        if not self.on:
            return
        tens, groups = st.tensors()
        conf = {**self.meta, "step": st.step, "wall_time_s": st.wall, "opt_groups": groups}
        save_safetensors_atomic(os.path.join(self.out_dir, CKPT), tens,
                                {"format": FORMAT, "config": json.dumps(conf, sort_keys=True)})
        write_json_atomic(os.path.join(self.out_dir, CONFIG), conf)
        write_json_atomic(self.curves_path, self.curves)

    def train_row(self, row: dict) -> None:
        if not self.on:
            return
        self.curves.append(row)
        for k in ("loss", "lr", "grad_norm", "samples_per_s"):
            self.writer.add_scalar(f"train/{k}", row[k], row["step"])

    def eval_row(self, step: int, scal: dict) -> None:
        if not self.on:
            return
        for k, v in scal.items():
            self.writer.add_scalar(f"eval/{k}", v, step)
        if self.curves and self.curves[-1]["step"] == step:
            self.curves[-1]["eval"] = scal
        else:
            self.curves.append({"step": step, "eval": scal})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _evaluate(cfg: TrainConfig, st: _State, data: _Data, diffusion: GaussianDiffusion, meta: dict,
              store: CheckpointStore, log) -> dict:
    """Prompt alignment of the EMA model on the held-out runs -> flat scalars (r2/<class>,
    pearson/<class>, r2_free_mean). A failed evaluation is logged and gives {}: it must not end a long run."""
    root = os.path.abspath(store.root)
    hn = Hypernet(st.ema, data.norm, diffusion, {**meta, "step": st.step, "data_dir": root,
                                                 "dataset": {**meta["dataset"], "dir": root}})
    try:
        res = evaluate_hypernet(hn, store, data.held, num_prompts=cfg.eval_prompts, per_prompt=cfg.eval_per_prompt,
                                sampler="ddim", steps=cfg.eval_steps, seed=cfg.seed, max_items=cfg.eval_max_items)
    except (ValueError, RuntimeError) as e:
        log(f"step {st.step}: evaluation failed ({type(e).__name__}: {e}); training goes on")
        res = {}
    return _flatten_scalars("", {k: res[k] for k in ("r2", "pearson", "r2_free_mean") if k in res}, {})


def _any_rank(flag: bool, world: int, device) -> bool:
    """True when `flag` holds on some DDP rank (every rank then stops at the same step)."""
    if world <= 1:
        return flag
    import torch.distributed as dist
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(x: torch.Tensor, world: int) -> torch.Tensor:
    if world <= 1:
        return x
    import torch.distributed as dist
    dist.all_reduce(x)
    return x / world


def _loop(cfg: TrainConfig, st: _State, stepper: _Step, fwd, rec: _Record, end: int, world: int, device, log,
          evaluate=None) -> bool:
    """Optimizer steps st.step -> end: warm-up + cosine lr, clipped AdamW step, EMA update; the mean
    loss every log_every steps (averaged over ranks), `evaluate(st)` -> scalars every eval_every
    steps (rank 0), a checkpoint every ckpt_every steps and at the end. -> True when the minutes
    budget stopped the run early."""
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=st.step, unit="step", desc=cfg.model, leave=False,
               disable=not (rec.on and sys.stderr.isatty()))
    t_start, wall0 = time.perf_counter(), st.wall
    n_since, t_since, loss_acc = 0, time.perf_counter(), torch.zeros((), device=device)
    st.model.train()
    stopped = False
    while st.step < end:
        lr = cfg.lr_at(st.step)
        for g in st.opt.param_groups:
            g["lr"] = lr
        loss = stepper.loss(fwd, st.gen)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(st.model.parameters(), cfg.grad_clip)
        st.opt.step()
        ema_update(st.ema, st.model, ema_decay_at(cfg, st.step))
        st.step += 1
        loss_acc += loss.detach()
        n_since += 1
        bar.update(1)
        st.wall = wall0 + time.perf_counter() - t_start
        out_of_time = cfg.minutes is not None and _any_rank(st.wall - wall0 >= 60 * cfg.minutes, world, device)
        last = st.step == end or out_of_time
        if st.step % cfg.log_every == 0 or last:
            mean_loss = _mean_over_ranks(loss_acc / n_since, world)
            rate = n_since * cfg.batch_size / max(1e-9, time.perf_counter() - t_since)
            row = {"step": st.step, "loss": float(mean_loss), "lr": lr, "grad_norm": float(gn),
                   "samples_per_s": rate, "wall_time_s": st.wall}
            rec.train_row(row)
            if rec.on:
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            log(f"step {st.step}/{cfg.steps} loss {row['loss']:.5f} lr {lr:.2e} grad {row['grad_norm']:.3f} "
                f"{rate:.0f} samples/s")
            n_since, t_since, loss_acc = 0, time.perf_counter(), torch.zeros((), device=device)
        if evaluate is not None and rec.on and (st.step % cfg.eval_every == 0 or last):
            scal = evaluate(st)
            rec.eval_row(st.step, scal)
            log(f"step {st.step} eval: " + ", ".join(f"{k} {v:.3f}" for k, v in scal.items()))
        if st.step % cfg.ckpt_every == 0 or last:
            rec.save(st)
        if out_of_time:
            log(f"stopping at step {st.step}: the {cfg.minutes} minute budget is spent")
            stopped = True
            break
    bar.close()
    return stopped


# ---------------------------------------------------------------------------- training
def train(cfg: TrainConfig | None, data_dir: str, out_dir: str, resume: bool = False, log=_default_log,
          device: str | None = None, stop_at: int | None = None) -> dict:
    """Train a DiHyFo on the collection in `data_dir`, writing checkpoints into `out_dir`.

    resume=True continues the run saved in out_dir exactly: its TrainConfig is used, with `steps`,
    `minutes`, `eval_every`, `ckpt_every` and `log_every` (RESUMABLE) taken from cfg; cfg differing
    in any other field is refused (ValueError naming it); cfg=None resumes as saved. The dataset must
    be the one the run was trained on (same manifest hash), wherever it now lies. Under torchrun
    (WORLD_SIZE > 1) every rank runs this; rank 0 writes. `stop_at`: stop (with a checkpoint) after
    that many steps, keeping the schedule of `cfg.steps`. -> the final config dict.
    """
    rank, world, device, owned = dist_setup(device)
    is_main = rank == 0
    if not is_main:
        log = lambda *_: None  # noqa: E731
    store = CheckpointStore(data_dir, verify="size")
    cfg, hcfg, tensors, saved = _open_run(cfg, store, out_dir, resume)
    if cfg.batch_size % world:
        raise ValueError(f"global batch {cfg.batch_size} is not divisible by the {world} DDP processes")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = _prepare_data(cfg, hcfg, store, saved, device)
    diffusion = GaussianDiffusion(cfg.diffusion_steps, device=device)
    st = _build_state(cfg, data.hcfg, device, tensors, saved)
    if saved is not None:
        log(f"resumed {out_dir} at step {st.step}")
    fwd = st.model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(st.model, device_ids=[device.index] if device.type == "cuda" else None)
    b = cfg.batch_size // world
    images = None
    if cfg.loss_match > 0:   # the loss-matching term reads the training or the validation split, never the test
        from ..collection.data import load_splits
        sp = load_splits(store)
        X, y = (sp.X_train, sp.y_train) if cfg.loss_match_split == "train" else (sp.X_val, sp.y_val)
        images = (X.to(device), y.to(device))
    stepper = _Step(cfg, st.model, diffusion, data.ds, data.norm, rank * b, (rank + 1) * b, images=images)
    meta = _run_meta(cfg, data, diffusion, store, out_dir, world, device)
    rec = _Record(out_dir, meta, is_main, resume, st.step)
    evaluate = None
    if cfg.eval_every:
        def evaluate(s):
            return _evaluate(cfg, s, data, diffusion, meta, store, log)

    n_model = sum(p.numel() for p in st.model.parameters())
    lay = data.hcfg.layout
    log(f"training {cfg.model} ({cfg.preset}, {n_model / 1e6:.2f} M params, {lay.num_tokens} {lay.kind} tokens of "
        f"{lay.token_width}) on {len(data.ds.rows)} checkpoints of {len(data.train_runs)} runs ({len(data.held)} "
        f"held out), batch {cfg.batch_size} x {world} process(es) on {device}, steps {st.step} -> {cfg.steps}")
    end = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
    stopped = _loop(cfg, st, stepper, fwd, rec, end, world, device, log, evaluate)
    if st.step >= end and not stopped and is_main and not os.path.exists(os.path.join(out_dir, CKPT)):
        rec.save(st)   # resumed at or past the end: still leave a checkpoint
    rec.close()
    if owned:
        # an exit with live gloo threads aborts the process ("terminate called without an active exception")
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    log(f"done: step {st.step}, {st.wall:.0f} s; model in {out_dir}")
    return {**meta, "step": st.step, "wall_time_s": st.wall}
