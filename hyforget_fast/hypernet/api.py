"""Public API of a trained hypernetwork: `load_hypernet(dir)` -> `Hypernet`, `.sample(...)`.

A Hypernet is the EMA model (eval mode) with everything needed to turn a loss prompt into
flat MLP parameters: its HypernetConfig, MLPSpec, ParamNorm, GaussianDiffusion and the
training metadata (classes, pivots, per-class loss ranges of the training data, held-out runs).
"""
from __future__ import annotations

import math

import torch

from ..ops.functional import detokenize, tokenize
from ..ops.spec import ParamNorm
from .diffusion import GaussianDiffusion
from .models import DiHyFo, HypernetConfig

SAMPLERS = ("ddim", "ddpm")


class Hypernet:
    """A trained DiHyFo-1 / DiHyFo-2, ready to sample.

    Attributes: model (DiHyFo, EMA weights, eval mode), cfg (HypernetConfig), spec (MLPSpec),
    norm (ParamNorm), diffusion (GaussianDiffusion), meta (dict: classes, pivots, loss_ranges,
    heldout_runs, dataset, train config, step, ...), device.
    """

    def __init__(self, model: DiHyFo, norm: ParamNorm, diffusion: GaussianDiffusion, meta: dict):
        self.model = model.eval()
        self.cfg: HypernetConfig = model.cfg
        self.spec = self.cfg.spec
        self.layout = model.layout
        self.device = model.token_mask.device
        self.norm = norm.to(self.device)
        self.diffusion = diffusion
        self.meta = meta

    # ---------------------------------------------------------------- facts
    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def classes(self) -> list:
        return list(self.meta.get("classes", range(self.num_classes)))

    @property
    def pivots(self) -> list:
        return list(self.meta.get("pivots", []))

    @property
    def loss_ranges(self) -> dict:
        """{class label (str): {min, max, mean, quantiles}} of the training checkpoints' losses."""
        return self.meta.get("loss_ranges", {})

    @property
    def heldout_runs(self) -> list[int]:
        return list(self.meta.get("heldout_runs", []))

    def __repr__(self) -> str:
        return (f"Hypernet({self.kind}, MLPSpec{self.spec.layer_sizes}, width {self.cfg.width}, depth "
                f"{self.cfg.depth}, step {self.meta.get('step')}, device {self.device})")

    def check_dataset(self, data) -> None:
        """Raise ValueError when a dataset (CheckpointStore or its folder) does not match this model."""
        from ..collection.store import CheckpointStore
        from .train import check_dataset_matches
        store = CheckpointStore(data, verify="size") if isinstance(data, str) else data
        check_dataset_matches(self.cfg, store)
        if list(store.classes) != self.classes:
            raise ValueError(f"dataset {store.root} has classes {list(store.classes)}, the model was trained "
                             f"on classes {self.classes}")

    # ---------------------------------------------------------------- inputs
    def _rows(self, x, k: int, width: int, what: str, hint: str) -> torch.Tensor:
        """(width,) or (k, width) -> (k, width) float32 on the device, finite, else ValueError."""
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.as_tensor(x, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"{what} must be a tensor or array of numbers: {e}") from None
        if not (x.dtype.is_floating_point or x.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{what} must hold real numbers, got {x.dtype}")
        x = x.detach().to(self.device, torch.float32)
        if x.ndim == 1:
            x = x[None].expand(k, -1)
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"{what} must have shape ({width},) or ({k}, {width}) {hint}; got {tuple(x.shape)}")
        if x.shape[0] != k:
            raise ValueError(f"{what} has {x.shape[0]} rows but k = {k} networks are asked for")
        bad = ~torch.isfinite(x)
        if bad.any():
            r, c = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{what} holds a non-finite value (NaN or inf) at row {r}, column {c}")
        return x

    @property
    def default_guidance(self) -> float:
        return DEFAULT_GUIDANCE if self.cfg.cond_dropout > 0 else 1.0

    def _guided(self, tgt: torch.Tensor, cond: tuple, w: float):
        """model_fn(x_t, t) -> guided x0: both branches in ONE batched forward when w != 1."""
        if w == 1:
            return lambda x_t, t: self.model(x_t, t, tgt, *cond)
        b = tgt.shape[0]
        drop = torch.arange(2 * b, device=tgt.device) >= b                 # (2b,) second half: no target
        tgt2 = tgt.repeat(2, 1)
        cond2 = tuple(c.repeat(2, *([1] * (c.ndim - 1))) for c in cond)

        def fn(x_t, t):
            out = self.model(x_t.repeat(2, 1, 1), t.repeat(2), tgt2, *cond2, drop_target=drop)
            c, u = out[:b], out[b:]
            return u + w * (c - u)
        return fn

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, target_losses, k: int, sampler: str = "ddim", steps: int = 50, seed: int = 0,
               theta=None, losses=None, batch: int | None = None, eta: float = 0.0,
               guidance: float | None = None) -> torch.Tensor:
        """Sample k networks whose per-class validation losses should be `target_losses`.

        target_losses (m,) broadcast to all k, or (k, m). DiHyFo-1 also needs theta ((P,) or (k, P)
        raw flat params) and their per-class losses ((m,) or (k, m)). sampler "ddim" (`steps`
        steps, `eta` 0 = deterministic given the noise) or "ddpm" (all diffusion steps). The same
        seed gives the same samples; `batch` samples in slices of that many (less memory).
        guidance w (classifier-free): x0 = x0_free + w (x0_cond - x0_free); 1 = plain conditional,
        > 1 follows the prompt harder (twice the compute); None = the model's default
        (`default_guidance`: DEFAULT_GUIDANCE if it was trained with target dropout, else 1).
        -> (k, P) float32 flat parameters in the package's order, on the model's device.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k (number of networks) must be a positive integer, got {k!r}")
        k = int(k)
        m, P = self.num_classes, self.spec.num_params
        hint_m = f"(one loss per class of {self.classes})"
        target = self._rows(target_losses, k, m, "target_losses", hint_m)
        if self.kind == "dihyfo1":
            if theta is None or losses is None:
                raise ValueError("DiHyFo-1 samples θ* from the current network: pass theta (its flat "
                                 "parameters, (P,) or (k, P)) and losses (its per-class losses)")
            theta = self._rows(theta, k, P, "theta", f"(P = {P} parameters of MLPSpec{self.spec.layer_sizes})")
            losses = self._rows(losses, k, m, "losses", hint_m)
        elif theta is not None or losses is not None:
            raise ValueError("DiHyFo-2 is conditioned on target losses only; it takes no theta or losses "
                             "(use a DiHyFo-1 to edit a given network)")
        if sampler == "ddim":
            self.diffusion.ddim_timesteps(steps)   # validates steps
        w = self.default_guidance if guidance is None else float(guidance)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
        if w != 1 and self.cfg.cond_dropout <= 0:
            raise ValueError("this model was trained without target dropout; it has no unconditional branch "
                             "for guidance != 1")
        batch = k if batch is None else int(batch)
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        mask = self.model.token_mask
        out = []
        for lo in range(0, k, batch):
            hi = min(k, lo + batch)
            tgt = target[lo:hi]
            if self.kind == "dihyfo1":
                th = tokenize(theta[lo:hi].contiguous(), self.layout, None, self.norm)
                cur = losses[lo:hi]

                cond = (th, cur)
            else:
                cond = ()
            fn = self._guided(tgt, cond, w)
            shape = (hi - lo, *mask.shape)
            if sampler == "ddim":
                x0 = self.diffusion.ddim_sample(fn, shape, steps=steps, eta=eta, mask=mask, generator=gen)
            else:
                x0 = self.diffusion.ddpm_sample(fn, shape, mask=mask, generator=gen)
            out.append(detokenize((x0 * mask).float().contiguous(), self.layout, self.norm))   # (b, P)
        return torch.cat(out)


DEFAULT_GUIDANCE = 1.0   # classifier-free guidance weight unless asked; > 1 available for models trained with target dropout


def load_hypernet(path: str, device=None) -> Hypernet:
    """Load the EMA model of a training folder (checkpoint.safetensors + config) -> Hypernet."""
    from .train import read_checkpoint
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    tensors, conf = read_checkpoint(path, device="cpu", prefixes=("ema.",))
    cfg = HypernetConfig.from_dict(conf["model"])
    model = DiHyFo(cfg, conf["diffusion"]["num_steps"])
    model.load_state_dict({k[len("ema."):]: v for k, v in tensors.items()})
    model = model.to(device).requires_grad_(False)
    norm = ParamNorm(cfg.spec, torch.tensor(conf["norm"]["stats"]))
    diffusion = GaussianDiffusion(**conf["diffusion"], device=device)
    meta = {k: v for k, v in conf.items() if k not in ("opt_groups",)}
    meta["path"] = path
    return Hypernet(model, norm, diffusion, meta)
