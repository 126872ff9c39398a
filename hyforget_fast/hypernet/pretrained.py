"""Pretrained hypernetworks shipped with the package: `pretrained()`, `load_pretrained(name)`.

Each lives in hyforget_fast/pretrained/<name>/:
  checkpoint.safetensors   the EMA weights only (`ema.*`, float32 or bfloat16), in the training
                           checkpoint format (hyforget-hypernet-1), so `load_hypernet` reads it
  card.json                the model card: the exact collection and training commands, the dataset
                           identity (data split), steps, wall-clock time and machine, prompt
                           alignment, conditioning controls, the forgetting table, one recorded
                           forget request (`check`) that a test reproduces, and why it was (re)trained
  start.safetensors        DiHyFo-1 only: the starting classifier of the recorded request
A pretrained model is matched to a collection by its data split (same digits, classes, seed,
fractions), not by the collection's bytes: its checkpoints only feed the baselines and
DiHyFo-1's default start, and the model carries its own loss ranges. `bench/retrain_pretrained.py`
retrains every shipped model from its card's commands and rewrites weights and card together.
"""
from __future__ import annotations

import json
import os

import torch

from ..collection.store import write_json_atomic
from .api import Hypernet, load_hypernet
from .checkpoint import CKPT, FORMAT, read_checkpoint, save_safetensors_atomic

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained")
CARD = "card.json"
START = "start.safetensors"


def _folder(name: str) -> str:
    names = [c["name"] for c in pretrained()]
    if name not in names:
        raise ValueError(f"no pretrained hypernetwork named {name!r}; shipped: {names or 'none'}")
    return os.path.join(PRETRAINED_DIR, name)


def pretrained() -> list[dict]:
    """The shipped hypernetworks' cards (name, kind, setting, commands, results...), sorted by name."""
    if not os.path.isdir(PRETRAINED_DIR):
        return []
    out = []
    for name in sorted(os.listdir(PRETRAINED_DIR)):
        path = os.path.join(PRETRAINED_DIR, name, CARD)
        if os.path.exists(path):
            with open(path) as f:
                out.append(json.load(f))
    return out


def load_card(name: str) -> dict:
    with open(os.path.join(_folder(name), CARD)) as f:
        return json.load(f)


def load_pretrained(name: str, device=None, data: str | None = None) -> Hypernet:
    """A shipped hypernetwork (names: `pretrained()`), ready to sample; its card is `.card`.
    data: a collection made on the same data split (the card's collect command makes one); needed
    by what reads the store (DiHyFo-1's default start, the report's baselines)."""
    hn = load_hypernet(_folder(name), device=device, data=data)
    hn.card = load_card(name)
    return hn


def load_start(name: str) -> torch.Tensor:
    """DiHyFo-1's starting classifier (P,) of the card's recorded request."""
    from safetensors.torch import load_file
    return load_file(os.path.join(_folder(name), START))["params"]


def export_pretrained(run_dir: str, out_dir: str, card: dict, dtype: torch.dtype = torch.float32,
                      start: torch.Tensor | None = None) -> str:
    """Write a trained run's EMA weights (cast to `dtype`), its config and `card` into out_dir,
    matched to collections by data split. -> out_dir."""
    tensors, conf = read_checkpoint(run_dir, prefixes=("ema.",))
    conf = {k: v for k, v in conf.items() if k not in ("opt_groups",)}
    ds = dict(conf.get("dataset") or {})
    ds.update({"match": "split", "dir": None, "abs_dir": None})
    conf["dataset"] = ds
    conf["data_dir"] = None
    os.makedirs(out_dir, exist_ok=True)
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    save_safetensors_atomic(os.path.join(out_dir, CKPT), cast, {"format": FORMAT, "config": json.dumps(conf, sort_keys=True)})
    if start is not None:
        save_safetensors_atomic(os.path.join(out_dir, START), {"params": start.detach().float().cpu().contiguous()}, {})
    write_json_atomic(os.path.join(out_dir, CARD), card)
    return out_dir
