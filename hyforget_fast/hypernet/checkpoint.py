"""The on-disk format of a hypernetwork training folder, and what ties it to its dataset.

A training folder holds
  checkpoint.safetensors   model.*, ema.*, opt.*, rng.* tensors; metadata {"format": FORMAT,
                           "config": the JSON config, "tensor_sha256": {name: sha256 of the
                           tensor's dtype, shape and bytes}}, written atomically with the tensors
  config.json              the same config, readable
  curves.json              the training curve

The config's "dataset" record identifies the collection by the sha256 of its manifest.json (which
lists every shard's size and hash), not by where it lies: "dir" is the collection's path RELATIVE
to the training folder (so a run moved together with its data still finds it) and "abs_dir" the
absolute path at training time (so a run moved alone still finds it). `resolve_dataset` finds it,
or checks a folder the user names (data=), by that hash.

Reading a checkpoint verifies it: a file safetensors cannot parse (truncated, overwritten header)
is refused with its path, every tensor read is checked against its recorded sha256 (a file
written before the hashes were recorded is read without that check) and must be finite.

Both the training loop (train.py) and the loader (api.py) import this module; neither imports
the other's internals.
"""
from __future__ import annotations

import hashlib
import json
import os

from ..collection.store import CheckpointStore

CKPT = "checkpoint.safetensors"
CONFIG = "config.json"
CURVES = "curves.json"
FORMAT = "hyforget-hypernet-1"
HASHES = "tensor_sha256"   # metadata key: {tensor name: tensor_sha256(tensor)}


# ---------------------------------------------------------------------------- safetensors
def tensor_sha256(t) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (C order): what a checkpoint records per tensor."""
    import torch
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_safetensors_atomic(path: str, tensors: dict, metadata: dict) -> None:
    """Write `tensors` (+ string metadata, + every tensor's sha256 under HASHES) to `path` through a
    temp file, fsync and os.replace."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp-{os.getpid()}"
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {**metadata, HASHES: json.dumps({k: tensor_sha256(v) for k, v in sorted(tensors.items())})}
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(out_dir: str, device="cpu", prefixes=None) -> tuple[dict, dict]:
    """-> (tensors with names starting with one of `prefixes` (all if None), config dict).
    The config is read from the safetensors metadata, written atomically with the tensors.
    ValueError naming the file when it is truncated or corrupted (unparseable, a tensor that does
    not match its recorded sha256, non-finite floating-point values)."""
    from safetensors import SafetensorError, safe_open
    path = os.path.join(out_dir, CKPT)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {CKPT} in {out_dir}: not a trained hypernetwork folder")
    tensors = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
            keys = list(f.keys())
            for k in keys:
                if prefixes is None or k.startswith(tuple(prefixes)):
                    tensors[k] = f.get_tensor(k)
        conf = json.loads(meta["config"])
        hashes = json.loads(meta[HASHES]) if HASHES in meta else None
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is truncated or corrupted: it cannot be read as a {FORMAT} checkpoint "
                         f"({type(e).__name__}: {e})") from None
    verify_tensors(path, tensors, hashes, keys)
    return tensors, conf


def verify_tensors(path: str, tensors: dict, hashes: dict | None, keys=None) -> None:
    """Raise ValueError naming `path` unless every tensor matches its sha256 in `hashes` (None: a file
    written before hashes were recorded; not checked), the file's tensor names (`keys`) are the
    recorded ones, and every floating-point tensor is finite."""
    import torch
    if hashes is not None:
        if keys is not None and sorted(keys) != sorted(hashes):
            raise ValueError(f"{path} is corrupted: its tensors {sorted(set(keys) ^ set(hashes))[:5]} differ from "
                             f"the ones recorded when it was written")
        for k, t in tensors.items():
            if tensor_sha256(t) != hashes.get(k):
                raise ValueError(f"{path} is corrupted: tensor {k!r} does not match the sha256 recorded when "
                                 f"the file was written")
    for k, t in tensors.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{path}: tensor {k!r} holds {bad} non-finite value(s) (NaN or inf); the "
                                 f"checkpoint is corrupted or its training diverged")


# ---------------------------------------------------------------------------- dataset identity
def manifest_sha256(root: str) -> str:
    """sha256 of a collection's manifest.json: the identity of the dataset (it lists every shard's hash)."""
    path = os.path.join(root, "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no manifest.json in {root}: not a collection folder")
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def dataset_identity(store: CheckpointStore, run_dir: str | None = None) -> dict:
    """What ties a model to its dataset: spec, classes, pivots, size and the manifest's hash.
    "dir" is the collection's path relative to `run_dir` (absolute when run_dir is None)."""
    man = store.manifest
    root = os.path.abspath(store.root)
    return {"dir": root if run_dir is None else os.path.relpath(root, os.path.abspath(run_dir)),
            "abs_dir": root, "layer_sizes": list(store.layer_sizes),
            "classes": list(store.classes), "pivots": list(man.get("pivots", [])),
            "num_checkpoints": int(man["num_checkpoints"]), "manifest_sha256": manifest_sha256(store.root),
            "split": man.get("split")}


def check_dataset_matches(cfg, store: CheckpointStore) -> None:
    """Raise ValueError when a dataset's spec differs from the model's (cfg: anything with .layer_sizes)."""
    if tuple(store.layer_sizes) != tuple(cfg.layer_sizes):
        raise ValueError(f"dataset {store.root} holds MLPSpec{tuple(store.layer_sizes)} networks, but the model "
                         f"was built for MLPSpec{tuple(cfg.layer_sizes)}")


def _describe(ident: dict) -> str:
    return (f"{ident.get('num_checkpoints')} checkpoints of MLPSpec{tuple(ident.get('layer_sizes', ()))}, classes "
            f"{ident.get('classes')}, manifest sha256 {str(ident.get('manifest_sha256'))[:12]}…")


SPLIT_IDENTITY = ("source", "classes", "seed", "fractions", "sizes", "data_sha256")


def split_differences(want: dict, got: dict) -> dict:
    """{field: (recorded, given)} for every SPLIT_IDENTITY field that the recorded split `want`
    holds and the split `got` (a manifest's record or `DigitSplits.describe()`) differs in."""
    return {k: (want[k], got.get(k)) for k in SPLIT_IDENTITY if k in want and want[k] != got.get(k)}


def check_same_dataset(ident: dict, root: str, what: str = "this hypernetwork") -> None:
    """Raise ValueError, naming `root`, when the collection there is not the one `ident` records.

    ident["match"] == "split" (pretrained models): any collection of the same MLPSpec, classes and
    data split will do (its checkpoints only serve the baselines and DiHyFo-1's default start; the
    model carries its own loss ranges); else the manifest hash must be equal."""
    if ident.get("match") == "split":
        from ..collection.store import CheckpointStore
        man = CheckpointStore(root, verify="size").manifest
        want, got_split = ident.get("split") or {}, man.get("split") or {}
        diff = list(split_differences(want, got_split))
        if list(man["spec"]["layer_sizes"]) != list(ident["layer_sizes"]) or list(man["classes"]) != list(ident["classes"]):
            diff = ["layer_sizes / classes"] + diff
        if diff:
            raise ValueError(f"{root} is not a collection of the data {what} was trained on: it differs in {diff} "
                             f"(wanted MLPSpec{tuple(ident['layer_sizes'])}, classes {ident['classes']}, split {want})")
        return
    got = manifest_sha256(root)
    if got != ident["manifest_sha256"]:
        raise ValueError(f"{root} is not the dataset {what} was trained on: its manifest sha256 is {got[:12]}…, "
                         f"the training dataset was {_describe(ident)} (at {ident.get('abs_dir', ident.get('dir'))})")


def dataset_candidates(run_dir: str, ident: dict) -> list[str]:
    """Where a run's dataset may be: "dir" against the run folder (or as is when absolute), then
    "abs_dir" (older configs hold only an absolute "dir")."""
    out = []
    for p in (ident.get("dir"), ident.get("abs_dir")):
        if p:
            p = p if os.path.isabs(p) else os.path.normpath(os.path.join(os.path.abspath(run_dir), p))
            if p not in out:
                out.append(p)
    return out


def resolve_dataset(run_dir: str, ident: dict, data: str | None = None) -> str | None:
    """The absolute path of a run's dataset, matched by manifest hash.

    data given: that folder, after checking it is the training dataset (ValueError naming it
    otherwise). data None: the first recorded location (relative to the run folder, then the
    absolute one) whose manifest matches; when the only collections found there are OTHER ones,
    ValueError; None when no recorded location holds a collection (a run moved without its data).
    """
    if data is not None:
        root = os.path.abspath(str(data))
        check_same_dataset(ident, root)
        return root
    wrong = None
    for p in dataset_candidates(run_dir, ident):
        if os.path.exists(os.path.join(p, "manifest.json")):
            try:
                check_same_dataset(ident, p)
                return p
            except ValueError as e:
                wrong = wrong or e
    if wrong is not None:
        raise ValueError(f"{wrong}; pass the training dataset explicitly (data= / --data)")
    return None
