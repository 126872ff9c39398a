"""Pretrained hypernetworks shipped with the package: `pretrained()` (short records),
`model_card(name)` (the full card), `load_pretrained(name)`.

Each lives in hyforget_fast/pretrained/<name>/:
  checkpoint.safetensors   the EMA weights only (`ema.*`, float32 or bfloat16), in the training
                           checkpoint format (hyforget-hypernet-1), so `load_hypernet` reads it
  card.json                the model card: the exact collection and training commands, the dataset
                           identity (data split), steps, wall-clock time and machine, prompt
                           alignment, conditioning controls, the forgetting table, one recorded
                           forget request (`check`) that a test reproduces, and why it was (re)trained
  start.safetensors        DiHyFo-1 only: the starting classifier of the recorded request
The card's storage.sha256 records each file's sha256; `load_pretrained` refuses a file that does
not match (naming it), and the checkpoint's own per-tensor hashes are checked as for any run.
A pretrained model is matched to a collection by its data split (same digits, classes, seed,
fractions), not by the collection's bytes: its checkpoints only feed the baselines and
DiHyFo-1's default start, and the model carries its own loss ranges. `bench/retrain_pretrained.py`
retrains every shipped model from its card's commands and rewrites weights and card together.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..collection.store import sha256_file, write_json_atomic
from .api import Hypernet, load_hypernet
from .checkpoint import CKPT, FORMAT, read_checkpoint, save_safetensors_atomic

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained")
CARD = "card.json"
START = "start.safetensors"


def _names() -> list[str]:
    if not os.path.isdir(PRETRAINED_DIR):
        return []
    return [n for n in sorted(os.listdir(PRETRAINED_DIR)) if os.path.exists(os.path.join(PRETRAINED_DIR, n, CARD))]


def _folder(name: str) -> str:
    names = _names()
    if name not in names:
        raise ValueError(f"no pretrained hypernetwork named {name!r}; shipped: {names or 'none'}")
    return os.path.join(PRETRAINED_DIR, name)


@dataclass(frozen=True)
class PretrainedModel:
    """One shipped hypernetwork, in short: `model_card(name)` has the whole card."""

    name: str
    kind: str            # "dihyfo1" / "dihyfo2"
    setting: str         # e.g. "mnist4"
    summary: str         # one line: architecture, data, training

    def __repr__(self) -> str:
        return f"PretrainedModel({self.name!r}: {self.summary})"


def _summary(card: dict) -> str:
    ds, tr = card.get("dataset") or {}, card.get("training") or {}
    mc = tr.get("model_config") or {}
    arch = f"width {mc['width']}, depth {mc['depth']}" if "width" in mc and "depth" in mc else "DiT"
    sizes = "-".join(str(s) for s in ds.get("layer_sizes", ()))
    steps = f", {tr['steps']} training steps" if tr.get("steps") else ""
    return (f"{card.get('kind', '?')} ({arch}) for MLPSpec {sizes or '?'} classifiers of digits "
            f"{ds.get('classes', '?')}{steps}")


def pretrained() -> list[PretrainedModel]:
    """The shipped hypernetworks, sorted by name: short records (name, kind, setting, one-line
    summary). The full model card (commands, dataset, results) is `model_card(name)`."""
    out = []
    for name in _names():
        card = model_card(name)
        out.append(PretrainedModel(name, card.get("kind", "?"), card.get("setting", "?"), _summary(card)))
    return out


def model_card(name: str) -> dict:
    """The full model card of a shipped hypernetwork (names: `pretrained()`): the exact collection and
    training commands, dataset identity, training time and machine, prompt alignment, forgetting
    table, the recorded forget request and the files' sha256."""
    with open(os.path.join(_folder(name), CARD)) as f:
        return json.load(f)


def verify_files(folder: str, card: dict) -> None:
    """Raise ValueError naming the file when one of `folder`'s files does not have the sha256 its
    card records (storage.sha256: {file name: hex}); a card without hashes is not checked."""
    for fname, want in ((card.get("storage") or {}).get("sha256") or {}).items():
        path = os.path.join(folder, fname)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing (its model card records it)")
        got = sha256_file(path)
        if got != want:
            raise ValueError(f"{path} is corrupted or truncated: its sha256 is {got[:12]}…, its model card "
                             f"records {want[:12]}… ({os.path.getsize(path)} bytes); reinstall the package")


def load_pretrained(name: str, device=None, data: str | None = None) -> Hypernet:
    """A shipped hypernetwork (names: `pretrained()`), ready to sample; its card is `.card`.
    data: a collection made on the same data split (the card's collect command makes one); needed
    by what reads the store (DiHyFo-1's default start, the report's baselines)."""
    folder, card = _folder(name), model_card(name)
    verify_files(folder, card)
    hn = load_hypernet(folder, device=device, data=data)
    hn.card = card
    if hn.card.get("sampling"):       # the card's sampling defaults (guidance grid chosen on validation)
        hn.meta["sampling"] = hn.card["sampling"]
    return hn


def load_start(name: str) -> torch.Tensor:
    """DiHyFo-1's starting classifier (P,) of the card's recorded request."""
    from safetensors.torch import load_file
    folder = _folder(name)
    verify_files(folder, model_card(name))
    return load_file(os.path.join(folder, START))["params"]


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
    write_card(out_dir, card, start)
    return out_dir


def write_card(out_dir: str, card: dict, start: torch.Tensor | None = None) -> dict:
    """Write a shipped model's card (and DiHyFo-1's start of its recorded request, when given) into
    its folder, with the sha256 of the weights and start files it ships. -> the card written."""
    if start is not None:
        save_safetensors_atomic(os.path.join(out_dir, START), {"params": start.detach().float().cpu().contiguous()}, {})
    files = [f for f in (CKPT, START) if os.path.exists(os.path.join(out_dir, f))]
    card = {**card, "storage": {**(card.get("storage") or {}),
                                "sha256": {f: sha256_file(os.path.join(out_dir, f)) for f in files}}}
    write_json_atomic(os.path.join(out_dir, CARD), card)
    return card
