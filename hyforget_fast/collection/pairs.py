"""(θ, L, θ*, L*) training pairs for DiHyFo-1 (dissertation §3.3.2).

A pair: a run chosen uniformly among runs with >= 2 checkpoints, then two distinct checkpoints
of that run chosen uniformly, θ the earlier (smaller step), θ* the later. Shards store each run
contiguously sorted by step, so a run is a row range [start, start + count) and a pair is two
offsets inside it; sampling a batch is pure index arithmetic.
"""
from __future__ import annotations

import numpy as np
import torch

from .store import CheckpointStore

MOVED_DIRECTIONS = ("any", "up")   # which loss moves make a pair "moved" (PairDataset.sample_batch)
BALANCE_BINS = 16                  # equal-width bins of log(L + 1e-3) per class (loss_balance_weights)


def loss_balance_weights(class_loss: np.ndarray, power: float, bins: int = BALANCE_BINS) -> np.ndarray:
    """class_loss (n, m) -> (n,) sampling weights, mean 1, that draw rare losses more often.

    Each class's log(L + 1e-3) is cut into `bins` equal-width bins over its range; a checkpoint is as
    rare as the rarest bin among its classes (share s of the checkpoints), and its weight is
    (1 / s) ** power. power 0 is uniform; power 1 gives a class's occupied bins about equal mass.
    Uniform draws give the high losses a forget prompt asks for to a few per cent of batches
    (the top eighth of a class's log range holds 1-2 % of the MNIST-4 card's store). A NaN loss
    (diverged network) is its own bin."""
    L = np.asarray(class_loss, dtype=np.float64)
    if L.ndim != 2 or L.shape[0] == 0:
        raise ValueError(f"class_loss must be (n > 0, m), got shape {L.shape}")
    if not power >= 0:
        raise ValueError(f"balance power must be >= 0, got {power}")
    n = L.shape[0]
    rarest = np.ones(n)
    for c in range(L.shape[1]):
        z = np.log(np.clip(L[:, c], 0, None) + 1e-3)
        fin = np.isfinite(z)
        b = np.full(n, bins, dtype=np.int64)                       # NaN / inf: bin `bins`
        if fin.any():
            lo, hi = z[fin].min(), z[fin].max()
            b[fin] = np.minimum(((z[fin] - lo) / max(hi - lo, 1e-12) * bins).astype(np.int64), bins - 1)
        share = np.bincount(b, minlength=bins + 1) / n              # (bins + 1,)
        rarest = np.minimum(rarest, share[b])
    w = rarest ** -float(power)
    return w / w.mean()


class PairDataset(torch.utils.data.Dataset):
    """Pairs from a CheckpointStore.

    - `ds[i]`: one pair, deterministic in (seed, i); memmaps are opened lazily in each process,
      so the dataset is safe in DataLoader workers.
    - `sample_batch(B, generator, device)`: a whole batch by vectorized indexing -> dict of
      theta (B, P), loss (B, m), theta_star (B, P), loss_star (B, m), run (B,), step, step_star.
      After `.to(device)` the arrays live on that device and batches are gathered there.
    - `sample_checkpoints(B, generator, device)`: single checkpoints (DiHyFo-2), uniform over
      the checkpoints of the selected runs, or by `balance(power)`'s weights -> dict of params
      (B, P), loss (B, m), run, step.
    - `runs`: restrict both samplers to these run ids (e.g. the training runs, with a held-out
      set of whole runs left out); `rows` are the global indices of their checkpoints.
    """

    def __init__(self, store: CheckpointStore | str, length: int | None = None, seed: int = 0,
                 verify: str = "size", runs=None):
        self.store = CheckpointStore(store, verify=verify) if isinstance(store, str) else store
        run = self.store.load("run")                          # (n,) small: one int per checkpoint
        if len(run) and np.any(np.diff(run) < 0):
            # runs are contiguous and sorted within a shard, and blocks hold increasing run ids
            raise ValueError("checkpoint store is not sorted by run; pairs need contiguous runs")
        uniq, start, count = np.unique(run, return_index=True, return_counts=True)
        if runs is not None:
            want = np.unique(np.asarray(list(runs), dtype=np.int64))
            missing = np.setdiff1d(want, uniq)
            if missing.size:
                raise ValueError(f"runs {missing[:10].tolist()} are not in the checkpoint store")
            keep = np.isin(uniq, want)
            uniq, start, count = uniq[keep], start[keep], count[keep]
        self.rows = np.concatenate([np.arange(s, s + c) for s, c in zip(start, count)]) if len(uniq) \
            else np.zeros(0, np.int64)                        # (n_sel,) global checkpoint indices
        ok = count >= 2
        if not ok.any():
            raise ValueError("no run has two checkpoints; cannot form (θ, θ*) pairs")
        self.run_ids, self.run_start, self.run_count = uniq[ok], start[ok].astype(np.int64), count[ok].astype(np.int64)
        self.length = int(length) if length is not None else len(self.store)
        self.seed = int(seed)
        self._dev = None   # dict of device tensors after .to(device)
        self._rows_t = None
        self._rows_cdf = None   # (n_sel,) float64 cumulative sampling weights after balance(); None = uniform

    def __len__(self) -> int:
        return self.length

    def pair_indices(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (B, 3) uniforms in [0, 1) -> global indices (i, j), i < j in the same run, both (B,)."""
        nr = len(self.run_ids)
        r = (u[:, 0].double() * nr).long().clamp_(max=nr - 1)
        start = torch.as_tensor(self.run_start, device=u.device)[r]
        cnt = torch.as_tensor(self.run_count, device=u.device)[r]
        a = (u[:, 1].double() * cnt).long().minimum(cnt - 1)
        b = (u[:, 2].double() * (cnt - 1)).long().minimum(cnt - 2)
        b = b + (b >= a).long()                                # b uniform over positions != a
        return start + torch.minimum(a, b), start + torch.maximum(a, b)

    def to(self, device) -> "PairDataset":
        """Copy params and losses to `device` once (when they fit) so batches never touch the disk."""
        device = torch.device(device)
        self._dev = {k: torch.from_numpy(self.store.load(k)).to(device)
                     for k in ("params", "class_loss", "run", "step")}
        return self

    def take(self, name: str, idx) -> torch.Tensor:
        """Rows idx (global checkpoint indices) of store array `name`, from the device copy if any."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return self._gather(name, idx, self._dev[name].device if self._dev is not None else "cpu")

    def _gather(self, name: str, idx: torch.Tensor, device) -> torch.Tensor:
        if self._dev is not None:
            return self._dev[name][idx.to(self._dev[name].device)].to(device)
        return torch.from_numpy(self.store.take(name, idx.cpu().numpy())).to(device)

    def sample_batch(self, batch_size: int, generator: torch.Generator | None = None, device=None,
                     change_bias: float = 0.0, part: slice = slice(None), moved_share: float = 0.0,
                     moved_min: float = 1.0, moved_direction: str = "any") -> dict:
        """part: the rows of the drawn batch to gather (a DDP rank's slice of the global batch; the
        random draws are those of the whole batch, so every rank follows the same stream).
        change_bias > 0: pairs whose losses move more are drawn more often. 4B candidate pairs
        are drawn uniformly and B kept without replacement with weight
        change_bias * max_c |L*_c - L_c| + 0.05 (c over all classes): uniform sampling gives
        DiHyFo-1 few loss-raising (forgetting) pairs to learn from (~4% move a class by > 1.5).
        moved_share > 0: that share of the batch are pairs in which some class loss moves by more
        than moved_min (from 16B uniform candidates, in draw order; uniform pairs fill the rest when
        too few qualify), the others uniform. Exclusive with change_bias.
        moved_direction: "any" (a loss rises or falls by more than moved_min) or "up" (a loss RISES
        by more than moved_min: the de-optimisation pairs a forget prompt asks for; most pairs that
        move by "any" are early-training drops of every class at once)."""
        if moved_share > 0 and change_bias > 0:
            raise ValueError("moved_share and change_bias are two ways to favour moving pairs; use one")
        if moved_direction not in MOVED_DIRECTIONS:
            raise ValueError(f"moved_direction must be one of {MOVED_DIRECTIONS}, got {moved_direction!r}")
        gdev = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device) if device is not None else (
            next(iter(self._dev.values())).device if self._dev is not None else torch.device("cpu"))
        n_cand = batch_size * (4 if change_bias > 0 else 1)
        u = torch.rand(n_cand, 3, generator=generator, device=gdev, dtype=torch.float64)
        i, j = self.pair_indices(u)
        if change_bias > 0:
            dl = (self._gather("class_loss", j, gdev) - self._gather("class_loss", i, gdev)).abs()   # (4B, m)
            w = change_bias * torch.nan_to_num(dl, nan=0.0).amax(1).double() + 0.05
            keep = torch.multinomial(w, batch_size, replacement=False, generator=generator)
            i, j = i[keep], j[keep]
        if moved_share > 0:
            n_big = int(round(moved_share * batch_size))
            u2 = torch.rand(16 * batch_size, 3, generator=generator, device=gdev, dtype=torch.float64)
            ci, cj = self.pair_indices(u2)
            dl = self._gather("class_loss", cj, gdev) - self._gather("class_loss", ci, gdev)   # (16B, m)
            dl = torch.nan_to_num(dl if moved_direction == "up" else dl.abs(), nan=0.0)
            big = (dl.amax(1) > moved_min).nonzero().flatten()[:n_big]
            n = len(big)
            i = torch.cat([ci[big], i[: batch_size - n]])
            j = torch.cat([cj[big], j[: batch_size - n]])
        i, j = i[part], j[part]
        return {"theta": self._gather("params", i, device), "loss": self._gather("class_loss", i, device),
                "theta_star": self._gather("params", j, device), "loss_star": self._gather("class_loss", j, device),
                "run": self._gather("run", i, device), "step": self._gather("step", i, device),
                "step_star": self._gather("step", j, device)}

    def balance(self, power: float) -> "PairDataset":
        """Draw `sample_checkpoints` by loss_balance_weights(power) over `rows` (power 0: uniform).
        The draws use the same uniforms as uniform sampling, so the random stream is unchanged."""
        if power == 0:
            self._rows_cdf = None
            return self
        w = loss_balance_weights(self.take("class_loss", self.rows).cpu().numpy(), power)
        cdf = np.cumsum(w)
        self._rows_cdf = torch.from_numpy(cdf / cdf[-1])
        return self

    def sample_checkpoints(self, batch_size: int, generator: torch.Generator | None = None, device=None,
                           part: slice = slice(None)) -> dict:
        """B checkpoints over `rows`, uniform or by `balance`'s weights -> params (B, P), loss (B, m),
        run (B,), step (B,); `part` as in sample_batch."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device) if device is not None else (
            next(iter(self._dev.values())).device if self._dev is not None else torch.device("cpu"))
        u = torch.rand(batch_size, generator=generator, device=gdev, dtype=torch.float64)
        n = len(self.rows)
        if self._rows_t is None or self._rows_t.device != gdev:
            self._rows_t = torch.as_tensor(self.rows, device=gdev)
        if self._rows_cdf is None:
            pos = (u * n).long()
        else:                                                  # inverse CDF of the balance weights
            self._rows_cdf = self._rows_cdf.to(gdev)
            pos = torch.searchsorted(self._rows_cdf, u, right=True)
        i = self._rows_t[pos.clamp_(max=n - 1)][part]
        return {"params": self._gather("params", i, device), "loss": self._gather("class_loss", i, device),
                "run": self._gather("run", i, device), "step": self._gather("step", i, device)}

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < self.length:
            raise IndexError(f"pair index {k} out of range [0, {self.length})")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(k))
        b = self.sample_batch(1, g, "cpu")
        return {key: v[0] for key, v in b.items()}
