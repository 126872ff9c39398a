"""Sharded on-disk checkpoint dataset.

Layout of a collection folder:
    collection.json            config + split record, written first (resume checks it matches)
    shards/block_00007/        one finished block = one shard, renamed into place atomically
        params.npy (n, P) f32, class_loss.npy (n, m) f32, class_acc.npy (n, m) f32,
        run.npy (n,) i64, step.npy (n,) i64, phase.npy (n,) i8, shard.json (sizes, sha256, run info)
    manifest.json              written last (by rank 0), lists every shard with sizes and sha256

Writes are atomic: a shard is written into `shards/.tmp-block_00007-<pid>/`, every file fsynced,
then the folder is os.replace'd to its final name and the parent fsynced; JSON files go through
a temp file + os.replace. A kill -9 at any moment leaves either a complete shard or a temp
folder that the next run deletes, never a half shard under a final name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from ..ops.spec import MLPSpec

FORMAT_VERSION = 1
ARRAYS = {"params": np.float32, "class_loss": np.float32, "class_acc": np.float32,
          "run": np.int64, "step": np.int64, "phase": np.int8}


class CorruptShardError(RuntimeError):
    """A shard's files do not match what its manifest records."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def shard_name(block: int) -> str:
    return f"block_{block:05d}"


def shards_dir(root: str) -> str:
    return os.path.join(root, "shards")


def clean_partial(root: str) -> list[str]:
    """Delete temp shard folders / temp JSON files left by a killed writer. -> names removed."""
    removed = []
    sd = shards_dir(root)
    for base in (root, sd):
        if not os.path.isdir(base):
            continue
        for name in os.listdir(base):
            if ".tmp-" in name:
                p = os.path.join(base, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
                removed.append(name)
    return removed


def finished_blocks(root: str) -> set[int]:
    """Blocks whose shard folder exists under its final name (i.e. was renamed in complete)."""
    sd = shards_dir(root)
    if not os.path.isdir(sd):
        return set()
    return {int(n[len("block_"):]) for n in os.listdir(sd)
            if n.startswith("block_") and ".tmp-" not in n and os.path.exists(os.path.join(sd, n, "shard.json"))}


def write_shard(root: str, block: int, arrays: dict, info: dict | None = None) -> dict:
    """Write one block's arrays as a shard, atomically. arrays: name -> ndarray (see ARRAYS).
    -> the shard's record (name, n, per-file size and sha256), also stored as shard.json."""
    n = len(arrays["run"])
    for k, dt in ARRAYS.items():
        if k not in arrays:
            raise ValueError(f"shard is missing array {k!r}")
        if len(arrays[k]) != n:
            raise ValueError(f"shard array {k!r} has {len(arrays[k])} rows, expected {n}")
    sd = shards_dir(root)
    os.makedirs(sd, exist_ok=True)
    name = shard_name(block)
    tmp = os.path.join(sd, f".tmp-{name}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    files = {}
    for k, dt in ARRAYS.items():
        p = os.path.join(tmp, k + ".npy")
        with open(p, "wb") as f:
            np.save(f, np.ascontiguousarray(arrays[k], dtype=dt))
            f.flush()
            os.fsync(f.fileno())
        files[k] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p),
                    "shape": list(np.shape(arrays[k]))}
    record = {"name": name, "block": int(block), "n": int(n), "files": files, "info": info or {}}
    with open(os.path.join(tmp, "shard.json"), "w") as f:
        json.dump(record, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = os.path.join(sd, name)
    if os.path.exists(final):  # another writer finished the same block first: identical by design
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    _fsync_dir(sd)
    return {k: v for k, v in record.items() if k != "info"}


def read_shard_record(root: str, block: int) -> dict:
    with open(os.path.join(shards_dir(root), shard_name(block), "shard.json")) as f:
        rec = json.load(f)
    return {k: v for k, v in rec.items() if k != "info"}


def write_manifest(root: str, meta: dict, num_blocks: int) -> dict:
    """Manifest covering shards 0..num_blocks-1; raises if any is missing."""
    missing = sorted(set(range(num_blocks)) - finished_blocks(root))
    if missing:
        raise RuntimeError(f"cannot write the manifest of {root}: shards {missing[:10]} are missing")
    shards = [read_shard_record(root, k) for k in range(num_blocks)]
    manifest = {"format_version": FORMAT_VERSION, **meta, "shards": shards,
                "num_checkpoints": int(sum(s["n"] for s in shards))}
    write_json_atomic(os.path.join(root, "manifest.json"), manifest)
    return manifest


def verify_shard(root: str, rec: dict, check_hash: bool = True) -> None:
    """Raise CorruptShardError naming the shard and file when sizes, shapes or hashes differ."""
    d = os.path.join(shards_dir(root), rec["name"])
    for k in ARRAYS:
        p = os.path.join(d, k + ".npy")
        want = rec["files"][k]
        if not os.path.exists(p):
            raise CorruptShardError(f"shard {rec['name']}: file {k}.npy is missing ({p})")
        size = os.path.getsize(p)
        if size != want["bytes"]:
            raise CorruptShardError(f"shard {rec['name']}: {k}.npy has {size} bytes, manifest says "
                                    f"{want['bytes']} (truncated or overwritten)")
        try:
            a = np.load(p, mmap_mode="r")
        except Exception as e:
            raise CorruptShardError(f"shard {rec['name']}: {k}.npy is not a readable .npy file: {e}") from e
        if list(a.shape) != want["shape"] or a.dtype != ARRAYS[k]:
            raise CorruptShardError(f"shard {rec['name']}: {k}.npy has shape {a.shape} {a.dtype}, "
                                    f"expected {tuple(want['shape'])} {np.dtype(ARRAYS[k])}")
        if check_hash and sha256_file(p) != want["sha256"]:
            raise CorruptShardError(f"shard {rec['name']}: {k}.npy fails its sha256 check (corrupted)")


class CheckpointStore:
    """Read side of a finished collection: verified, memory-mapped, zero-copy.

    `store.array(name)` -> list of per-shard read-only memmaps; `store.offsets` (S+1,) global row
    offsets. Memmaps are opened lazily per process (safe to pickle into DataLoader workers).
    """

    def __init__(self, root: str, verify: str = "hash"):
        if verify not in ("hash", "size"):
            raise ValueError(f"verify must be 'hash' or 'size', got {verify!r}")
        self.root = root
        mp = os.path.join(root, "manifest.json")
        if not os.path.exists(mp):
            hint = " (collection unfinished? re-run `hyforget collect` to resume)" if os.path.isdir(shards_dir(root)) else ""
            raise FileNotFoundError(f"no manifest.json in {root}{hint}")
        with open(mp) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{mp}: format_version {self.manifest.get('format_version')} is not "
                             f"supported (expected {FORMAT_VERSION})")
        self.layer_sizes = tuple(self.manifest["spec"]["layer_sizes"])
        self.classes = tuple(self.manifest["classes"])
        P = MLPSpec(self.layer_sizes).num_params
        m = len(self.classes)
        for rec in self.manifest["shards"]:
            verify_shard(root, rec, check_hash=(verify == "hash"))
            if rec["files"]["params"]["shape"][1:] != [P] or rec["files"]["class_loss"]["shape"][1:] != [m]:
                raise CorruptShardError(f"shard {rec['name']}: arrays do not match spec {self.layer_sizes} "
                                        f"with {m} classes")
        self.offsets = np.cumsum([0] + [r["n"] for r in self.manifest["shards"]]).astype(np.int64)
        self._pid, self._maps = None, None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_params(self) -> int:
        return self.manifest["shards"][0]["files"]["params"]["shape"][1]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_pid"], d["_maps"] = None, None  # never ship open memmaps to a worker
        return d

    def _open(self) -> dict:
        if self._pid != os.getpid():
            sd = shards_dir(self.root)
            self._maps = {k: [np.load(os.path.join(sd, r["name"], k + ".npy"), mmap_mode="r")
                              for r in self.manifest["shards"]] for k in ARRAYS}
            self._pid = os.getpid()
        return self._maps

    def array(self, name: str) -> list[np.ndarray]:
        if name not in ARRAYS:
            raise KeyError(f"unknown array {name!r}; arrays are {list(ARRAYS)}")
        return self._open()[name]

    def take(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Rows idx (any shape, global indices) of array `name`, gathered shard by shard."""
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"checkpoint index out of range [0, {len(self)})")
        maps = self.array(name)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty((flat.size, *maps[0].shape[1:]), dtype=maps[0].dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = maps[s][flat[sel] - self.offsets[s]]
        return out.reshape(*idx.shape, *maps[0].shape[1:])

    def load(self, name: str) -> np.ndarray:
        """Whole array concatenated in memory (one copy)."""
        return np.concatenate([np.asarray(a) for a in self.array(name)])
