"""DDPM training and sampling (ancestral, fixed variances) and DDIM, for x0-predicting models.

G.pt's schedule: 1000 linear betas from 1e-4 to 0.02. Every schedule tensor and every
per-step sampler coefficient is computed once, in float64, and stored on the model's device
in float32 (no re-allocation per step). A `model_fn(x_t, t) -> x0_hat` closure carries the
conditioning. Noise is drawn from a caller-supplied torch.Generator: the same seed gives the
same samples. `mask` (broadcastable to x) zeroes padding values of parameter tokens in the noise
and the samples, and restricts the loss to real values.
"""
from __future__ import annotations

from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


class GaussianDiffusion:
    """Linear-beta DDPM with x0 prediction."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, device="cpu"):
        if num_steps < 1 or not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need num_steps >= 1 and 0 < beta_start <= beta_end < 1, got "
                             f"{num_steps}, {beta_start}, {beta_end}")
        self.num_steps, self.beta_start, self.beta_end = int(num_steps), float(beta_start), float(beta_end)
        self.device = torch.device(device)
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        ab = torch.cumprod(1.0 - betas, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        f = dict(device=self.device, dtype=torch.float32)
        self.betas = betas.to(**f)
        self.alphas_cumprod = ab.to(**f)
        self.sqrt_ab = ab.sqrt().to(**f)                                   # signal scale of x_t
        self.sqrt_1mab = (1 - ab).sqrt().to(**f)                           # noise scale of x_t
        # posterior q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, var): DDPM's fixed (small) variance
        self.post_c0 = (betas * ab_prev.sqrt() / (1 - ab)).to(**f)
        self.post_ct = ((1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)).to(**f)
        self.post_std = (betas * (1 - ab_prev) / (1 - ab)).sqrt().to(**f)
        self._ab64 = ab
        self._ddim_cache: dict = {}

    def to_dict(self) -> dict:
        return {"num_steps": self.num_steps, "beta_start": self.beta_start, "beta_end": self.beta_end}

    # ------------------------------------------------------------------ training
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; t (B,) long."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return self.sqrt_ab[t].view(shape) * x0 + self.sqrt_1mab[t].view(shape) * noise

    def sample_t(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_steps, (batch,), generator=generator, device=self.device)

    def training_loss(self, model_fn: ModelFn, x0: torch.Tensor, mask: torch.Tensor,
                      generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                      return_pred: bool = False):
        """MSE between model_fn's x0 prediction and x0, over real (mask == 1) values, each value
        weighted by `weight` (broadcastable to x0, zero on padding; default: the mask).

        t (B,) and noise (like x0, already masked) may be given, e.g. drawn for a global batch
        and sliced per DDP rank; otherwise they are drawn from `generator` (t first).
        return_pred=True -> (loss, x0 prediction) for losses on the predicted parameters."""
        w = mask if weight is None else weight
        if t is None:
            t = self.sample_t(x0.shape[0], generator)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device) * mask
        pred = model_fn(self.q_sample(x0, t, noise), t)
        loss = ((pred - x0) ** 2 * w).sum() / (w.expand_as(x0).sum())
        return (loss, pred) if return_pred else loss

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def ddpm_sample(self, model_fn: ModelFn, shape, mask: torch.Tensor | float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling over all num_steps steps with the fixed posterior variance."""
        x = _randn(shape, generator, self.device) * mask
        tb = torch.empty(shape[0], dtype=torch.long, device=self.device)
        for i in reversed(range(self.num_steps)):
            x0 = model_fn(x, tb.fill_(i))
            x = self.post_c0[i] * x0 + self.post_ct[i] * x
            if i > 0:
                x = x + self.post_std[i] * _randn(shape, generator, self.device) * mask
        return x0

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` distinct timesteps from num_steps-1 down to 0, evenly spaced."""
        if not 1 <= int(steps) <= self.num_steps:
            raise ValueError(f"DDIM steps must be in [1, {self.num_steps}], got {steps}")
        ts = torch.linspace(self.num_steps - 1, 0, int(steps), dtype=torch.float64).round().long().tolist()
        return list(dict.fromkeys(ts))

    def _ddim_coefs(self, steps: int, eta: float):
        """Per-step (t, c_x0, c_eps, sigma) on the device, computed once per (steps, eta)."""
        key = (int(steps), float(eta))
        if key not in self._ddim_cache:
            ts = self.ddim_timesteps(steps)
            ab = self._ab64
            rows = []
            for k, t in enumerate(ts):
                a_t = ab[t]
                a_p = ab[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
                sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).clamp(min=0).sqrt()
                rows.append([a_p.sqrt(), (1 - a_p - sigma ** 2).clamp(min=0).sqrt(), sigma, a_t.sqrt(), (1 - a_t).sqrt()])
            self._ddim_cache[key] = (ts, torch.tensor(rows, dtype=torch.float64).to(self.device, torch.float32))
        return self._ddim_cache[key]

    @torch.no_grad()
    def ddim_sample(self, model_fn: ModelFn, shape, steps: int = 50, eta: float = 0.0,
                    mask: torch.Tensor | float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM (Song et al. 2021) with any number of steps; eta = 0 is deterministic given x_T."""
        ts, c = self._ddim_coefs(steps, eta)
        x = _randn(shape, generator, self.device) * mask
        tb = torch.empty(shape[0], dtype=torch.long, device=self.device)
        for k, t in enumerate(ts):
            x0 = model_fn(x, tb.fill_(t))
            if k + 1 == len(ts):
                break
            sq_ap, c_dir, sigma, sq_at, sq_1mat = c[k]
            eps = (x - sq_at * x0) / sq_1mat
            x = sq_ap * x0 + c_dir * eps
            if eta > 0:
                x = x + sigma * _randn(shape, generator, self.device) * mask
        return x0
