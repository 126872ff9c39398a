"""Hypernetwork checkpoints are verified on load: every tensor against the sha256 recorded when it
was written, floating-point tensors finite, and a file safetensors cannot parse refused, always
naming the file; the shipped models also against the file hashes of their cards."""
import hashlib
import json
import os
import shutil

import pytest
import torch

from hyforget_fast.cli import main
from hyforget_fast.hypernet import pretrained as P
from hyforget_fast.hypernet.api import load_hypernet
from hyforget_fast.hypernet.checkpoint import CKPT, FORMAT, HASHES, read_checkpoint, save_safetensors_atomic

SHIPPED = [c.name for c in P.pretrained()]


def _run(tmp_path, tensors=None, name="run"):
    run = tmp_path / name
    run.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = tensors if tensors is not None else {"ema.w": torch.randn(300, 40, generator=g),
                                                   "ema.b": torch.randn(40, generator=g).bfloat16(),
                                                   "rng.state": torch.arange(7, dtype=torch.uint8)}
    save_safetensors_atomic(str(run / CKPT), tensors, {"format": FORMAT, "config": json.dumps({"step": 3})})
    return str(run), tensors


def _overwrite_tail(path, n=2000, seed=1):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - n)
        f.write(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
                .numpy().tobytes())


def test_a_written_checkpoint_reads_back_with_its_hashes(tmp_path):
    run, tensors = _run(tmp_path)
    got, conf = read_checkpoint(run)
    assert conf == {"step": 3} and set(got) == set(tensors)
    for k in tensors:
        assert got[k].dtype == tensors[k].dtype and torch.equal(got[k], tensors[k]), k
    from safetensors import safe_open
    with safe_open(os.path.join(run, CKPT), framework="pt") as f:
        hashes = json.loads(f.metadata()[HASHES])
    assert sorted(hashes) == sorted(tensors)
    # recorded as sha256 of "dtype|shape|" + the raw bytes, recomputed here without the package's helper
    w = tensors["ema.w"]
    assert hashes["ema.w"] == hashlib.sha256(b"torch.float32|(300, 40)|" + w.numpy().tobytes()).hexdigest()


def test_random_bytes_over_the_tail_are_refused_naming_the_file(tmp_path):
    run, _ = _run(tmp_path)
    path = os.path.join(run, CKPT)
    _overwrite_tail(path)
    with pytest.raises(ValueError, match=f"{path} is corrupted: tensor .* does not match the sha256"):
        read_checkpoint(run)


def test_a_truncated_file_is_refused_naming_the_file(tmp_path):
    run, _ = _run(tmp_path)
    path = os.path.join(run, CKPT)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match=f"{path} is truncated or corrupted"):
        read_checkpoint(run)
    with open(path, "r+b") as f:
        f.truncate(5)                                                  # not even the header length
    with pytest.raises(ValueError, match=f"{path} is truncated or corrupted"):
        read_checkpoint(run)


def test_non_finite_weights_are_refused_with_or_without_hashes(tmp_path):
    w = torch.ones(10, 3)
    w[4, 1] = float("nan")
    run, _ = _run(tmp_path, {"ema.w": w})                            # hashes match: the NaN was written so
    with pytest.raises(ValueError, match=f"{os.path.join(run, CKPT)}: tensor 'ema.w' holds 1 non-finite"):
        read_checkpoint(run)
    # a file written before hashes were recorded: no hash check, the finiteness check still holds
    from safetensors.torch import save_file
    old = tmp_path / "old"
    old.mkdir()
    save_file({"ema.w": w}, str(old / CKPT), metadata={"format": FORMAT, "config": "{}"})
    with pytest.raises(ValueError, match="holds 1 non-finite"):
        read_checkpoint(str(old))
    save_file({"ema.w": torch.ones(3)}, str(old / CKPT), metadata={"format": FORMAT, "config": "{}"})
    assert torch.equal(read_checkpoint(str(old))[0]["ema.w"], torch.ones(3))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_match_their_cards_hashes(name):
    folder = os.path.join(P.PRETRAINED_DIR, name)
    recorded = P.model_card(name)["storage"]["sha256"]
    assert CKPT in recorded
    for fname, want in recorded.items():
        with open(os.path.join(folder, fname), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == want, fname
    tensors, _ = read_checkpoint(folder)                              # and the per-tensor hashes inside
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


@pytest.fixture
def corrupted_copy(tmp_path, monkeypatch):
    name = "mnist4-dihyfo2"
    assert name in SHIPPED
    shipped = tmp_path / "shipped"
    shutil.copytree(os.path.join(P.PRETRAINED_DIR, name), shipped / name)
    monkeypatch.setattr(P, "PRETRAINED_DIR", str(shipped))
    path = str(shipped / name / CKPT)
    _overwrite_tail(path)
    return name, str(shipped / name), path


def test_a_corrupted_pretrained_model_is_refused(corrupted_copy):
    name, folder, path = corrupted_copy
    with pytest.raises(ValueError, match=f"{path} is corrupted or truncated: its sha256 is .* its model card"):
        P.load_pretrained(name, device="cpu")
    with pytest.raises(ValueError, match=f"{path} is corrupted: tensor"):   # as a folder: its own hashes
        load_hypernet(folder, device="cpu")


def test_cli_refuses_a_corrupted_hypernetwork_in_one_line(corrupted_copy, tmp_path, capsys):
    _, folder, path = corrupted_copy
    assert main(["forget", "--hypernet", folder, "--forget", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hyforget forget: error: ") and path in err


def test_cli_refuses_an_out_that_is_a_file_before_sampling(tmp_path, capsys, monkeypatch):
    from hyforget_fast.hypernet import api

    def boom(*a, **k):
        raise AssertionError("the hypernetwork was loaded before --out was checked")
    monkeypatch.setattr(api, "load_hypernet", boom)
    out = tmp_path / "taken"
    out.write_text("x")
    assert main(["forget", "--hypernet", str(tmp_path), "--forget", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is an existing file" in err and out.read_text() == "x"
