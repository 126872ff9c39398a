"""Sharded store: atomic writes, resume after kill -9, corruption detection, pair sampling."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hyforget_fast.cli import main as cli_main
from hyforget_fast.collection.pairs import PairDataset, loss_balance_weights
from hyforget_fast.collection.store import CheckpointStore, CorruptShardError, finished_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["collect", "--preset", "mnist4", "--runs", "16", "--block-runs", "2", "--epochs", "3",
        "--ckpts-per-run", "12", "--seed", "5", "--threads", "1"]
KEYS = ("params", "class_loss", "class_acc", "run", "step", "phase")


def _run(out, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hyforget_fast.cli", *ARGS, "--out", out], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    p = _run(out)
    assert p.wait(300) == 0, p.stderr.read().decode()[-2000:]
    return out


def _contents(root):
    st = CheckpointStore(root)
    return {k: st.load(k) for k in KEYS}


def test_resume_after_sigkill_equals_uninterrupted_run(full, tmp_path):
    out = str(tmp_path / "killed")
    p = _run(out)
    deadline = time.time() + 120
    while not finished_blocks(out) and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(0.15)  # land somewhere inside a later block (possibly mid-write)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = finished_blocks(out)
    assert 1 <= len(done) < 8, f"kill should land mid-collection, {len(done)} of 8 blocks done"
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    # a writer killed mid-shard leaves only a temp folder; plant one to be sure it is ignored
    junk = os.path.join(out, "shards", ".tmp-block_00007-999999")
    os.makedirs(junk, exist_ok=True)
    open(os.path.join(junk, "params.npy"), "wb").write(b"\x93NUMPY partial")
    q = _run(out)
    err = q.communicate(timeout=300)[1].decode()
    assert q.returncode == 0, err[-2000:]
    assert f"{len(done)} of my 8 already done" in err
    assert not any(".tmp-" in n for n in os.listdir(os.path.join(out, "shards")))
    a, b = _contents(full), _contents(out)
    for k in KEYS:
        assert np.array_equal(a[k], b[k]), k
    key = a["run"] * 10**6 + a["step"]
    assert len(np.unique(key)) == len(key)  # no duplicated checkpoint


def test_resume_refuses_a_different_config(full, tmp_path):
    out = str(tmp_path / "c")
    shutil.copytree(full, out)
    assert cli_main([*ARGS[:-4], "--seed", "6", "--threads", "1", "--out", out, "--quiet"]) == 2


def test_truncated_or_corrupted_shard_is_named(full, tmp_path):
    out = str(tmp_path / "bad")
    shutil.copytree(full, out)
    CheckpointStore(out)  # intact: opens
    p = os.path.join(out, "shards", "block_00003", "class_loss.npy")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-8])
    for verify in ("hash", "size"):
        with pytest.raises(CorruptShardError, match=r"block_00003.*class_loss.*bytes"):
            CheckpointStore(out, verify=verify)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    open(p, "wb").write(bytes(flipped))
    with pytest.raises(CorruptShardError, match=r"block_00003.*class_loss.*sha256"):
        CheckpointStore(out)
    CheckpointStore(out, verify="size")  # same size: only the hash can tell
    os.remove(p)
    with pytest.raises(CorruptShardError, match=r"block_00003.*missing"):
        CheckpointStore(out, verify="size")
    with pytest.raises(FileNotFoundError, match="manifest"):
        CheckpointStore(str(tmp_path))


def test_store_is_memory_mapped_and_take_matches_load(full):
    st = CheckpointStore(full)
    maps = st.array("params")
    assert all(isinstance(m, np.memmap) for m in maps) and len(maps) == 8
    man = json.load(open(os.path.join(full, "manifest.json")))
    assert man["format_version"] == 1 and man["split"]["seed"] == 0 and man["classes"] == [0, 1, 2, 3]
    assert man["spec"]["layer_sizes"] == [784, 2, 4] and len(st) == man["num_checkpoints"]
    idx = np.random.default_rng(0).integers(0, len(st), (5, 7))
    assert np.array_equal(st.take("class_loss", idx), st.load("class_loss")[idx])


def test_pairs_are_same_run_and_strictly_ordered(full):
    ds = PairDataset(full)
    g = torch.Generator().manual_seed(0)
    b = ds.sample_batch(4096, g)
    assert b["theta"].shape == (4096, 784 * 2 + 2 + 2 * 4 + 4) and b["loss_star"].shape == (4096, 4)
    run = torch.from_numpy(CheckpointStore(full).load("run"))
    assert (b["step"] < b["step_star"]).all()
    # theta really is a checkpoint of the same run as theta*, and the pair reaches every run
    st = CheckpointStore(full)
    P = torch.from_numpy(st.load("params"))
    i, j = ds.pair_indices(torch.rand(4096, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert torch.equal(run[i], run[j]) and (i < j).all()
    assert torch.equal(P[i], b["theta"]) and torch.equal(P[j], b["theta_star"])
    counts = torch.bincount(run)
    assert set(run[i].tolist()) == set(torch.nonzero(counts >= 2).squeeze(1).tolist())
    # the device-resident path gathers the same batch
    g2 = torch.Generator().manual_seed(0)
    b2 = ds.to("cpu").sample_batch(4096, g2)
    assert all(torch.equal(b[k], b2[k]) for k in b)


def test_pairs_across_dataloader_workers(full):
    ds = PairDataset(full, length=64, seed=1)
    dl = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    batches = list(dl)
    assert len(batches) == 4 and all((x["step"] < x["step_star"]).all() for x in batches)
    again = torch.cat([x["theta"] for x in dl])
    assert torch.equal(torch.cat([x["theta"] for x in batches]), again)  # deterministic per index
    assert torch.equal(ds[5]["theta"], batches[0]["theta"][5])


def test_plot_coverage_writes_png(full, tmp_path):
    png = str(tmp_path / "cov.png")
    assert cli_main(["plot-coverage", full, "--png", png]) == 0
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_change_biased_pairs_favour_moving_losses_and_stay_valid(full):
    ds = PairDataset(full)
    a = ds.sample_batch(2048, torch.Generator().manual_seed(3))
    b = ds.sample_batch(2048, torch.Generator().manual_seed(3), change_bias=1.0)
    b2 = ds.sample_batch(2048, torch.Generator().manual_seed(3), change_bias=1.0)
    assert all(torch.equal(b[k], b2[k]) for k in b)                      # seeded
    assert (b["step"] < b["step_star"]).all() and torch.equal(b["run"], b["run"])
    move = lambda x: (x["loss_star"] - x["loss"]).abs().amax(1).mean().item()  # noqa: E731
    assert move(b) > 1.2 * move(a)


def test_moved_share_pairs_fill_that_share_of_the_batch(full):
    ds = PairDataset(full)
    b = ds.sample_batch(512, torch.Generator().manual_seed(5), moved_share=0.5)
    b2 = ds.sample_batch(512, torch.Generator().manual_seed(5), moved_share=0.5)
    assert all(torch.equal(b[k], b2[k]) for k in b)                      # seeded
    assert (b["step"] < b["step_star"]).all()                           # still valid pairs (same run, later)
    moved = (b["loss_star"] - b["loss"]).abs().nan_to_num(0.0).amax(1) > 1.0     # (B,)
    u = ds.sample_batch(512, torch.Generator().manual_seed(5))
    base = float(((u["loss_star"] - u["loss"]).abs().nan_to_num(0.0).amax(1) > 1.0).float().mean())
    # the first half are moving pairs whenever 16B uniform candidates hold that many of them
    n_big = int(moved[:256].sum())
    assert n_big == 256 or base < 0.05
    assert float(moved.float().mean()) >= min(0.5, base) and float(moved.float().mean()) > base
    with pytest.raises(ValueError, match="use one"):
        ds.sample_batch(8, torch.Generator().manual_seed(5), moved_share=0.5, change_bias=1.0)


def test_moved_up_pairs_raise_a_class_loss(full):
    """moved_direction "up": the moved share are de-optimisation pairs (some class loss RISES by > 1),
    which "any" mostly is not (early-training pairs drop every loss at once)."""
    ds = PairDataset(full)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    up = ds.sample_batch(512, g(), moved_share=0.5, moved_direction="up")
    rise = lambda b: (b["loss_star"] - b["loss"]).nan_to_num(0.0).amax(1) > 1.0   # noqa: E731  (B,)
    u = ds.sample_batch(512, g())
    base = float(rise(u).float().mean())
    n_up = int(rise(up)[:256].sum())
    assert base < 0.5 and (n_up == 256 or base < 0.05)
    assert float(rise(up).float().mean()) > base
    assert (up["step"] < up["step_star"]).all()
    with pytest.raises(ValueError, match="moved_direction"):
        ds.sample_batch(8, g(), moved_share=0.5, moved_direction="down")


def test_loss_balance_weights_follow_the_rarest_bin():
    """A checkpoint is as rare as its rarest class-loss bin; its weight is (1 / share) ** power."""
    rng = np.random.default_rng(0)
    n = 1000
    L = np.exp(rng.uniform(-3, -2, size=(n, 3)))          # every class in one narrow band ...
    L[:10, 1] = np.exp(3.0)                                # ... but 10 checkpoints lose class 1 (top bin)
    L[10:40, 2] = np.exp(3.0)                              # and 30 lose class 2
    L[40, 0] = np.nan                                      # one diverged network: its own bin
    assert np.array_equal(loss_balance_weights(L, 0.0), np.ones(n))
    for power in (0.5, 1.0):
        w = loss_balance_weights(L, power)
        assert w.shape == (n,) and np.isclose(w.mean(), 1.0)
        assert np.allclose(w[:10] / w[10], (30 / 10) ** power)          # share 1 % against 3 %
        assert np.isclose(w[40] / w[:10].mean(), 10.0 ** power)          # share 0.1 %
        common = w[41:]
        assert np.isfinite(common).all() and common.max() / common.min() <= n ** power   # share >= 1 / n
        assert w[:10].min() > common.max()
    with pytest.raises(ValueError, match="power"):
        loss_balance_weights(L, -1.0)
    with pytest.raises(ValueError, match="shape"):
        loss_balance_weights(L[:, 0], 0.5)


def test_balanced_checkpoints_are_drawn_by_their_weights(full):
    ds = PairDataset(full)
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    u = ds.sample_checkpoints(4096, g())
    assert torch.equal(ds.balance(0.0).sample_checkpoints(4096, g())["step"], u["step"])   # 0 = uniform
    w = loss_balance_weights(ds.take("class_loss", ds.rows).numpy(), 1.0)
    b = ds.balance(1.0).sample_checkpoints(4096, g())
    b2 = ds.sample_checkpoints(4096, g())
    assert all(torch.equal(b[k], b2[k]) for k in b)                      # seeded
    # a drawn row's mean weight is E_w[w] = mean(w^2) / mean(w) under weighted draws, 1 under uniform
    at = {(int(r), int(s)): k for k, (r, s) in enumerate(zip(ds.take("run", ds.rows), ds.take("step", ds.rows)))}
    drawn = lambda x: w[[at[(int(r), int(s))] for r, s in zip(x["run"], x["step"])]]   # noqa: E731
    expect = float((w ** 2).mean() / w.mean())
    assert expect > 1.2 and abs(drawn(b).mean() - expect) < 0.15 * expect
    assert abs(drawn(u).mean() - 1.0) < 0.15
