"""Public API of a trained hypernetwork: `load_hypernet(dir)` -> `Hypernet`, `.sample(...)`.

A Hypernet is the EMA model (eval mode) with everything needed to turn a loss prompt into
flat MLP parameters: its HypernetConfig, MLPSpec, ParamNorm, GaussianDiffusion and the
training metadata (classes, pivots, per-class loss ranges of the training data, held-out runs).
"""
from __future__ import annotations

import sys

import torch

from ..collection.store import CheckpointStore
from ..ops.functional import canonical_perms, class_metrics, detokenize, permute, tokenize
from ..ops.spec import ParamNorm
from .checkpoint import (check_dataset_matches, check_same_dataset, dataset_candidates, read_checkpoint,
                         resolve_dataset)
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
    def unit_order(self) -> str:
        """"canonical" when the model was trained on canonically ordered hidden units (then
        DiHyFo-1's input θ is put in its canonical order, and θ* returned in θ's own order)."""
        return (self.meta.get("train") or {}).get("unit_order") or "random"

    @property
    def heldout_runs(self) -> list[int]:
        return list(self.meta.get("heldout_runs", []))

    def __repr__(self) -> str:
        return (f"Hypernet({self.kind}, MLPSpec{self.spec.layer_sizes}, width {self.cfg.width}, depth "
                f"{self.cfg.depth}, step {self.meta.get('step')}, device {self.device})")

    @property
    def data_dir(self) -> str:
        """Absolute path of the training dataset (found by `load_hypernet` by its manifest hash,
        or given there as data=); FileNotFoundError naming the places looked at when it was not found."""
        d = self.meta.get("data_dir")
        if d is None:
            where = ", ".join(self.meta.get("dataset_searched", [])) or "nowhere recorded"
            raise FileNotFoundError(f"the training dataset of {self.meta.get('path', 'this hypernetwork')} was not "
                                    f"found (looked in {where}); pass it explicitly: load_hypernet(path, data=DIR) "
                                    f"or --data DIR")
        return d

    def check_dataset(self, data) -> None:
        """Raise ValueError when a dataset (CheckpointStore or its folder) is not the one this model
        was trained on: another spec, other classes, or (when the model records it) another manifest hash."""
        store = CheckpointStore(str(data), verify="size") if not isinstance(data, CheckpointStore) else data
        check_dataset_matches(self.cfg, store)
        if list(store.classes) != self.classes:
            raise ValueError(f"dataset {store.root} has classes {list(store.classes)}, the model was trained "
                             f"on classes {self.classes}")
        if (self.meta.get("dataset") or {}).get("manifest_sha256"):
            check_same_dataset(self.meta["dataset"], store.root)

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

    def _guided(self, tgt: torch.Tensor, cond: tuple, w):
        """model_fn(x_t, t) -> guided x0 for weight w (a number, or (b,) one per row): every row at
        1 is the plain conditional model, every row at 0 the unconditional branch alone (one
        forward each); otherwise both branches in ONE batched forward, mixed row by row."""
        w = torch.as_tensor(w, dtype=torch.float64).reshape(-1).expand(tgt.shape[0])
        if bool((w == 1).all()):
            return lambda x_t, t: self.model(x_t, t, tgt, *cond)
        b = tgt.shape[0]
        if bool((w == 0).all()):
            none = torch.ones(b, dtype=torch.bool, device=tgt.device)
            return lambda x_t, t: self.model(x_t, t, tgt, *cond, drop_target=none)
        drop = torch.arange(2 * b, device=tgt.device) >= b                 # (2b,) second half: no target
        tgt2 = tgt.repeat(2, 1)
        cond2 = tuple(c.repeat(2, *([1] * (c.ndim - 1))) for c in cond)
        wb = w.to(tgt.device, torch.float32)[:, None, None]                 # (b, 1, 1)

        def fn(x_t, t):
            out = self.model(x_t.repeat(2, 1, 1), t.repeat(2), tgt2, *cond2, drop_target=drop)
            c, u = out[:b], out[b:]
            return u + wb * (c - u)
        return fn

    def _weights(self, guidance, k: int) -> torch.Tensor:
        """None (the model's default), one weight, or k weights (one per network) -> (k,) float64."""
        g = self.default_guidance if guidance is None else guidance
        try:
            w = torch.as_tensor(g, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"guidance must be a number or a sequence of k numbers, got {guidance!r}") from None
        if w.numel() == 1:
            w = w.expand(k)
        if w.numel() != k:
            raise ValueError(f"guidance has {w.numel()} weights but k = {k} networks are asked for "
                             "(give one weight, or one per network)")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"guidance must be finite and >= 0, got {guidance!r}")
        if bool((w != 1).any()) and self.cfg.cond_dropout <= 0:
            raise ValueError("this model was trained without target dropout; it has no unconditional branch "
                             "for guidance != 1")
        return w

    @property
    def guidance_grid(self) -> list[float]:
        """The guidance weights `forget` spreads its candidates over by default: the model card's
        grid (chosen on validation at release, meta["sampling"]["guidance_grid"]), else the model's
        single default weight."""
        grid = (self.meta.get("sampling") or {}).get("guidance_grid")
        return [float(x) for x in grid] if grid else [self.default_guidance]

    def guidance_grid_for(self, n_forget: int) -> list[float]:
        """The default grid of a request to forget `n_forget` classes: the card's grid for that
        many classes (meta["sampling"]["guidance_by_size"], chosen on validation at release: a
        larger edit wants a larger weight), else `guidance_grid`."""
        grid = ((self.meta.get("sampling") or {}).get("guidance_by_size") or {}).get(str(int(n_forget)))
        return [float(x) for x in grid] if grid else self.guidance_grid

    def _levels_for(self, key: str, n_forget: int) -> list[float] | None:
        """The card's `sampling.{key}_levels_by_size` for a request of n_forget classes, else its
        `{key}_levels`; None when the card has neither."""
        s = self.meta.get("sampling") or {}
        levels = (s.get(f"{key}_levels_by_size") or {}).get(str(int(n_forget))) or s.get(f"{key}_levels")
        return [float(x) for x in levels] if levels else None

    def low_levels_for(self, n_forget: int) -> list[float] | None:
        """The low prompt levels (quantiles of each retained class's training loss) of a request to
        forget `n_forget` classes: the card's (meta["sampling"]["low_levels_by_size"], else its
        "low_levels", chosen on validation at release), None when the card has none (`forget`
        then uses its defaults)."""
        return self._levels_for("low", n_forget)

    def high_levels_for(self, n_forget: int) -> list[float] | None:
        """The high prompt levels (quantiles of each forgotten class's training loss) of a request,
        as `low_levels_for` (meta["sampling"]["high_levels_by_size"], else "high_levels")."""
        return self._levels_for("high", n_forget)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, target_losses, k: int, sampler: str = "ddim", steps: int = 50, seed: int = 0,
               theta=None, losses=None, batch: int | None = None, eta: float = 0.0,
               guidance=None, progress: bool = False) -> torch.Tensor:
        """Sample k networks whose per-class validation losses should be `target_losses`.

        target_losses (m,) broadcast to all k, or (k, m). DiHyFo-1 also needs theta ((P,) or (k, P)
        raw flat params) and their per-class losses ((m,) or (k, m)). sampler "ddim" (`steps`
        steps, `eta` 0 = deterministic given the noise) or "ddpm" (all diffusion steps). The same
        seed gives the same samples; `batch` samples in slices of that many (less memory).
        guidance w (classifier-free): x0 = x0_free + w (x0_cond - x0_free); 1 = plain conditional,
        > 1 follows the prompt harder (twice the compute), 0 = the unconditional branch; one weight
        for all k, or a sequence of k (one per network: a guidance grid in one batched call); None =
        the model's default (`default_guidance`: DEFAULT_GUIDANCE if it was trained with target
        dropout, else 1).
        progress: a bar over the denoising steps on stderr.
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
        w = self._weights(guidance, k)                                      # (k,)
        batch = k if batch is None else int(batch)
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        mask = self.model.token_mask
        n_steps = len(self.diffusion.ddim_timesteps(steps)) if sampler == "ddim" else self.diffusion.num_steps
        from tqdm import tqdm
        bar = tqdm(total=n_steps * -(-k // batch), unit="step", desc=f"sample {k} ({sampler})", leave=False,
                   disable=not (progress and sys.stderr.isatty()))
        out = []
        for lo in range(0, k, batch):
            hi = min(k, lo + batch)
            tgt = target[lo:hi]
            back = None
            if self.kind == "dihyfo1":
                th_raw = theta[lo:hi].contiguous()
                # neuron tokens: an equivariant model, θ goes in its own unit order (models.py)
                canon = self.unit_order == "canonical" and self.layout.kind == "layer"
                perms = canonical_perms(th_raw, self.spec) if canon else None
                th = tokenize(th_raw, self.layout, perms, self.norm)
                if perms is not None:   # inverse perms: θ* comes back in θ's unit order
                    back = torch.cat([perms[:, o:o + h].argsort(dim=1)
                                      for o, h in zip(self.spec.hidden_offsets, self.spec.hidden_sizes)], 1)
                cur = losses[lo:hi]

                cond = (th, cur)
            else:
                cond = ()
            guided = self._guided(tgt, cond, w[lo:hi])

            def fn(x_t, t, guided=guided):
                bar.update(1)
                return guided(x_t, t)
            shape = (hi - lo, *mask.shape)
            if sampler == "ddim":
                x0 = self.diffusion.ddim_sample(fn, shape, steps=steps, eta=eta, mask=mask, generator=gen)
            else:
                x0 = self.diffusion.ddpm_sample(fn, shape, mask=mask, generator=gen)
            flat = detokenize((x0 * mask).float().contiguous(), self.layout, self.norm)      # (b, P)
            out.append(flat if back is None else permute(flat, self.spec, back))
        bar.close()
        return torch.cat(out)

    def refine(self, target_losses, params, X: torch.Tensor, y: torch.Tensor, rounds: int = 1,
               seed: int = 0, **sample_kw) -> torch.Tensor:
        """DiHyFo-1 in closed loop: edit `params` (k, P) (e.g. what `sample` returned) `rounds` more
        times toward `target_losses`, each edit starting from the current networks conditioned on
        their per-class losses measured on (X (N, d), y (N,) class indices 0..m-1).

        One edit moves a network about three quarters of the way on a large rise (bench/RESULTS.md
        §21); a second edit from the measured result closes most of the rest. The losses DiHyFo-1
        is conditioned on are validation losses, so (X, y) should be validation-like data that
        the result is NOT scored on afterwards (e.g. one half of the validation split,
        `hyforget_fast.hypernet.evaluate.validation_halves`), or the score is fitted to itself.
        sample_kw: `sample`'s sampler, steps, batch, eta, guidance, progress. Round r = 0, 1, ... samples with
        seed + 1 + r.
        -> (k, P) float32 on the model's device.
        """
        if self.kind != "dihyfo1":
            raise ValueError("refine edits given networks: it needs a DiHyFo-1 (DiHyFo-2 takes no start)")
        if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
            raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
        if not isinstance(params, torch.Tensor) or params.ndim != 2:
            raise ValueError(f"params must be a (k, P) tensor of flat parameters, got "
                             f"{type(params).__name__} {tuple(getattr(params, 'shape', ()))}")
        k = params.shape[0]
        out = self._rows(params, k, self.spec.num_params, "params", f"(P = {self.spec.num_params})")
        X, y = X.to(self.device), y.to(self.device)
        for r in range(int(rounds)):
            losses = class_metrics(out, self.spec, X, y).class_loss.float()      # (k, m) measured now
            if not torch.isfinite(losses).all():
                raise ValueError(f"refine round {r}: {int((~torch.isfinite(losses).all(1)).sum())} networks have "
                                 "non-finite losses on the feedback data (NaN parameters?)")
            out = self.sample(target_losses, k, seed=int(seed) + 1 + r, theta=out, losses=losses, **sample_kw)
        return out


DEFAULT_GUIDANCE = 1.0   # classifier-free guidance weight unless asked; > 1 available for models trained with target dropout


def load_hypernet(path: str, device=None, data: str | None = None) -> Hypernet:
    """Load the EMA model of a training folder (checkpoint.safetensors + config) -> Hypernet.

    The training dataset is found by its manifest hash: `data` (a collection folder) when given,
    else where the config records it (relative to the training folder, then the absolute path
    of training time). A folder holding another collection is refused (ValueError naming it);
    a dataset found nowhere only matters to what needs it (`Hypernet.data_dir` then says so).
    """
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
    if "dataset" in meta:
        # in memory, data_dir and dataset.dir hold the resolved absolute path; when it was found
        # nowhere, data_dir is None and dataset.dir the first place looked at (a reader fails naming it)
        found = resolve_dataset(path, meta["dataset"], data)
        searched = [] if found else dataset_candidates(path, meta["dataset"])
        meta["dataset_searched"] = searched
        meta["dataset"] = {**meta["dataset"], "dir": found or (searched[0] if searched else None)}
        meta["data_dir"] = found
    elif data is not None:
        meta["data_dir"] = str(data)
    return Hypernet(model, norm, diffusion, meta)
