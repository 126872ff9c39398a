"""The command line's one grammar and its refusals; runs that can be moved (dataset found by manifest hash)."""
import json
import os
import shlex
import shutil

import pytest
import torch

from hyforget_fast.cli import build_parser, forget_set, main, read_classifier
from hyforget_fast.collection.collect import collect, preset
from hyforget_fast.hypernet.api import load_hypernet
from hyforget_fast.hypernet.checkpoint import CKPT, FORMAT, read_checkpoint, save_safetensors_atomic
from hyforget_fast.hypernet.train import TrainConfig, train

torch.set_num_threads(1)
QUIET = lambda *_: None  # noqa: E731
SMALL = ["--width", "32", "--depth", "1", "--heads", "2", "--chunk", "64"]


def _collect(out, seed=0):
    collect(preset("mnist4", runs=8, block_runs=8, epochs=2, ckpts_per_run=10, seed=seed), out, log=QUIET)
    return out


def _train_cli(data, out, model="dihyfo2", extra=()):
    return main(["train", "--model", model, "--data", data, "--out", out, "--steps", "2", "--batch-size", "8",
                 "--warmup-steps", "1", "--log-every", "1", "--device", "cpu", "--quiet", *SMALL, *extra])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two collections (same spec and classes, different seeds) and a DiHyFo-1 and a DiHyFo-2 on the first."""
    r = tmp_path_factory.mktemp("cli")
    _collect(str(r / "data"))
    _collect(str(r / "other"), seed=1)
    assert _train_cli(str(r / "data"), str(r / "dihyfo2")) == 0
    assert _train_cli(str(r / "data"), str(r / "dihyfo1"), "dihyfo1") == 0
    return r


def _err(capsys) -> str:
    return capsys.readouterr().err


def _forget_ran(rc: int, out: str) -> bool:
    """`hyforget forget` wrote its result; exit 0 exactly when the chosen classifier meets the
    forget-and-keep criterion on validation (recomputed here from forget.json), else 3."""
    info = json.load(open(os.path.join(out, "forget.json")))
    ok = info["val_forget_acc"] <= 0.01 and info["val_retain_acc"] >= 0.95
    return rc == (0 if ok else 3) and info["forgot"] is ok


# ------------------------------------------------------------------ help and grammar
def test_every_subcommand_help_has_an_example_that_parses(capsys):
    ap = build_parser()
    sub = next(a for a in ap._actions if a.choices and "train" in a.choices)
    assert set(sub.choices) >= {"collect", "train", "evaluate-hypernet", "forget", "evaluate", "demo", "plot-coverage"}
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "example:" in out, name
        examples = [ln.strip() for ln in out.split("example:", 1)[1].splitlines() if ln.strip()]
        assert examples and all(ex.startswith(f"hyforget {name} ") for ex in examples), (name, examples)
        for ex in examples:   # the example is valid command-line grammar
            a = ap.parse_args(shlex.split(ex)[1:])
            assert a.cmd == name


def test_forget_set_is_written_one_way_in_forget_and_evaluate(capsys, monkeypatch):
    assert forget_set("2,3") == (2, 3) and forget_set("3") == (3,) and forget_set(" 2, 3") == (2, 3)
    ap = build_parser()
    a = ap.parse_args(["forget", "--hypernet", "h", "--out", "o", "--forget", "2,3"])
    assert a.forget == (2, 3)
    a = ap.parse_args(["evaluate", "--data", "d", "--out", "o", "--forget", "2", "--forget", "2,3"])
    assert a.forget == [(2,), (2, 3)]
    # the other spellings are refused, in both commands
    for argv in (["forget", "--hypernet", "h", "--out", "o", "--forget", "2", "3"],
                 ["evaluate", "--data", "d", "--out", "o", "--forget", "2", "3"]):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(argv)
        assert e.value.code == 2 and "unrecognized arguments: 3" in _err(capsys)
    for cmd in (["forget", "--hypernet", "h", "--out", "o"], ["evaluate", "--data", "d", "--out", "o"]):
        for bad, msg in (("2;3", "separated by commas"), ("two", "separated by commas"), ("2,2", "repeats")):
            with pytest.raises(SystemExit):
                ap.parse_args([*cmd, "--forget", bad])
            assert msg in _err(capsys)
    # evaluate hands the sets to the report as lists of labels
    import hyforget_fast.unlearn.report as report
    seen = {}

    def fake(data, hns, sets, **kw):
        seen["sets"], seen["kw"] = sets, kw
        return {"verdicts": []}
    monkeypatch.setattr(report, "evaluate_forgetting", fake)
    monkeypatch.setattr(report, "markdown_tables", lambda rep: "")
    assert main(["evaluate", "--data", "d", "--out", "o", "--forget", "2", "--forget", "2,3"]) == 0
    assert seen["sets"] == [[2], [2, 3]] and seen["kw"]["guidance"] is None and seen["kw"]["starts"] is None
    # the guidance grid and DiHyFo-1's starts reach the report as given
    assert main(["evaluate", "--data", "d", "--out", "o", "--forget", "2", "--guidance", "4,8,16",
                 "--starts", "best", "random"]) == 0
    assert seen["kw"]["guidance"] == [4.0, 8.0, 16.0] and seen["kw"]["starts"] == ["best", "random"]


# ------------------------------------------------------------------ train flags and resume
def test_train_exposes_the_results_knobs(root, tmp_path):
    out = str(tmp_path / "knobs")
    assert _train_cli(str(root / "data"), out, "dihyfo1",
                      ["--heldout-frac", "0.25", "--loss-weighting", "value", "--pair-change-bias", "0.5",
                       "--target-dropout", "0", "--ema-decay", "0.9", "--lr", "1e-3", "--max-freq-log2", "4",
                       "--weight-decay", "0.05", "--grad-clip", "1.5"]) == 0
    conf = json.load(open(os.path.join(out, "config.json")))
    t, m = conf["train"], conf["model"]
    assert (t["heldout_frac"], t["loss_weighting"], t["pair_change_bias"], t["warmup_steps"], t["ema_decay"],
            t["lr"], t["weight_decay"], t["grad_clip"]) == (0.25, "value", 0.5, 1, 0.9, 1e-3, 0.05, 1.5)
    assert (m["cond_dropout"], m["max_freq_log2"], m["width"], m["depth"]) == (0.0, 4.0, 32, 1)
    assert len(conf["heldout_runs"]) == 2   # 0.25 of 8 runs


def test_train_takes_the_moved_pair_knobs_and_refuses_two_biases(root, tmp_path, capsys):
    out = str(tmp_path / "moved")
    assert _train_cli(str(root / "data"), out, "dihyfo1", ["--pair-moved-share", "0.5", "--pair-moved-direction", "up"]) == 0
    t = json.load(open(os.path.join(out, "config.json")))["train"]
    assert (t["pair_moved_share"], t["pair_moved_direction"]) == (0.5, "up")
    assert _train_cli(str(root / "data"), str(tmp_path / "both"), "dihyfo1",
                      ["--pair-moved-share", "0.5", "--pair-change-bias", "1"]) == 2
    assert "use one" in capsys.readouterr().err


def test_train_takes_balance_for_dihyfo2_only(root, tmp_path, capsys):
    out = str(tmp_path / "bal")
    assert _train_cli(str(root / "data"), out, "dihyfo2", ["--balance", "0.5"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["train"]["balance"] == 0.5
    assert _train_cli(str(root / "data"), str(tmp_path / "bal1"), "dihyfo1", ["--balance", "0.5"]) == 2
    assert "DiHyFo-1's pairs" in capsys.readouterr().err


def test_resume_refuses_a_flag_that_would_change_the_run(root, tmp_path, capsys):
    out = str(tmp_path / "r")
    shutil.copytree(root / "dihyfo2", out)
    data = str(root / "data")
    base = ["train", "--model", "dihyfo2", "--data", data, "--out", out, "--resume", "--device", "cpu", "--quiet"]
    for flags, named in ((["--preset", "paper"], "--preset"), (["--lr", "0.01"], "--lr"),
                         (["--width", "64"], "--width"), (["--target-dropout", "0.3"], "--target-dropout"),
                         (["--loss-weighting", "value"], "--loss-weighting"),
                         (["--heldout-frac", "0.5", "--seed", "3"], "--heldout-frac")):
        assert main(base + flags) == 2
        err = _err(capsys)
        assert named in err and "would change it" in err, (flags, err)
    assert main(base + ["--seed", "3"]) == 2 and "--seed (saved 0, given 3)" in _err(capsys)
    assert main([*base[:2], "dihyfo1", *base[3:]]) == 2 and "holds a dihyfo2 run" in _err(capsys)
    assert read_checkpoint(out, prefixes=())[1]["step"] == 2   # nothing was trained by a refused call
    # the cadence may change, and a flag equal to the saved value changes nothing
    assert main(base + ["--steps", "3", "--log-every", "5", "--width", "32", "--preset", "tiny"]) == 0
    conf = read_checkpoint(out, prefixes=())[1]
    assert conf["step"] == 3 and conf["train"]["steps"] == 3 and conf["train"]["log_every"] == 5


def test_train_api_resume_refuses_a_changed_config_and_resumes_with_none(root, tmp_path):
    out = str(tmp_path / "api")
    shutil.copytree(root / "dihyfo2", out)
    data = str(root / "data")
    saved = TrainConfig.from_dict(read_checkpoint(out, prefixes=())[1]["train"])
    with pytest.raises(ValueError, match=r"lr \(saved 0.0004, given 0.002\)"):
        train(TrainConfig(**{**saved.to_dict(), "lr": 2e-3}), data, out, resume=True, log=QUIET, device="cpu")
    with pytest.raises(ValueError, match="a new run needs a TrainConfig"):
        train(None, data, str(tmp_path / "new"), log=QUIET, device="cpu")
    train(None, data, out, resume=True, log=QUIET, device="cpu")   # as saved: nothing left to do
    assert read_checkpoint(out, prefixes=())[1]["step"] == 2


# ------------------------------------------------------------------ forget --model
def test_forget_model_file_is_checked(root, tmp_path, capsys):
    from safetensors.torch import save_file
    hn = load_hypernet(str(root / "dihyfo1"), device="cpu")
    P = hn.spec.num_params
    base = ["forget", "--hypernet", str(root / "dihyfo1"), "--forget", "2", "--k", "2", "--steps", "2",
            "--device", "cpu"]
    first = str(tmp_path / "first")
    assert _forget_ran(main([*base, "--out", first]), first)
    # the classifier `forget` writes is a valid --model
    second = str(tmp_path / "second")
    assert _forget_ran(main([*base, "--out", second, "--model", os.path.join(first, "model.safetensors")]), second)
    info = json.load(open(tmp_path / "second" / "forget.json"))
    assert info["start"]["source"] == "user model"
    capsys.readouterr()

    def bad(name, tensors=None, meta=None, raw=None):
        p = str(tmp_path / name)
        if raw is not None:
            open(p, "wb").write(raw)
        else:
            save_file(tensors, p, metadata=meta)
        assert main([*base, "--out", str(tmp_path / "o"), "--model", p]) == 2
        return _err(capsys)

    assert "is not a safetensors file" in bad("junk.safetensors", raw=b"\x00\x01 not a safetensors file")
    assert "not 'params'" in bad("keys.safetensors", {"0.weight": torch.zeros(2, 784)})
    assert "shape (5,), expected (1582,)" in bad("short.safetensors", {"params": torch.zeros(5)})
    assert "MLPSpec(784, 3, 4) classifier" in bad("spec.safetensors", {"params": torch.zeros(P)},
                                                  {"layer_sizes": "[784, 3, 4]"})
    nan = torch.zeros(P)
    nan[7] = float("nan")
    assert "non-finite value(s) (NaN or inf), the first at index 7" in bad("nan.safetensors", {"params": nan})
    assert "not floating-point" in bad("int.safetensors", {"params": torch.zeros(P, dtype=torch.int64)})
    assert main([*base, "--out", str(tmp_path / "o"), "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in _err(capsys)
    with pytest.raises(ValueError, match="shape"):
        read_classifier(str(tmp_path / "short.safetensors"), hn.spec)


# ------------------------------------------------------------------ moved runs
def test_a_moved_run_finds_its_dataset_by_manifest_hash(root, tmp_path, capsys):
    a = tmp_path / "a"
    a.mkdir()
    shutil.copytree(root / "data", a / "data")
    run = str(a / "run")
    assert _train_cli(str(a / "data"), run, "dihyfo1") == 0
    conf = json.load(open(os.path.join(run, "config.json")))
    assert conf["dataset"]["dir"] == os.path.join("..", "data") and conf["data_dir"] == conf["dataset"]["dir"]

    # run and data moved together: the relative path finds the data
    shutil.move(str(a), str(tmp_path / "b"))
    run = str(tmp_path / "b" / "run")
    hn = load_hypernet(run, device="cpu")
    assert hn.data_dir == str(tmp_path / "b" / "data")
    fg = ["forget", "--hypernet", run, "--forget", "3", "--k", "2", "--steps", "2", "--device", "cpu"]
    assert _forget_ran(main([*fg, "--out", str(tmp_path / "f1")]), str(tmp_path / "f1"))   # from the best stored checkpoint
    assert json.load(open(tmp_path / "f1" / "forget.json"))["start"]["source"] != "user model"

    # the data moved elsewhere: not found, a clear message; --data / data= point at it
    shutil.move(str(tmp_path / "b" / "data"), str(tmp_path / "moved"))
    capsys.readouterr()
    assert main([*fg, "--out", str(tmp_path / "f2")]) == 2
    err = _err(capsys)
    assert "training dataset" in err and "was not found" in err and "--data" in err
    assert _forget_ran(main([*fg, "--out", str(tmp_path / "f3"), "--data", str(tmp_path / "moved")]), str(tmp_path / "f3"))
    assert load_hypernet(run, device="cpu", data=str(tmp_path / "moved")).data_dir == str(tmp_path / "moved")

    # another collection (same spec and classes) is refused by name
    other = str(root / "other")
    assert main([*fg, "--out", str(tmp_path / "f4"), "--data", other]) == 2
    err = _err(capsys)
    assert f"{other} is not the dataset this hypernetwork was trained on" in err
    with pytest.raises(ValueError, match="is not the dataset"):
        load_hypernet(run, device="cpu", data=other)
    assert main(["evaluate-hypernet", run, "--data", other, "--steps", "2"]) == 2
    assert "is not the dataset" in _err(capsys)
    with pytest.raises(ValueError, match="is not the dataset"):
        load_hypernet(str(root / "dihyfo2"), device="cpu").check_dataset(other)
    # resuming on the moved data is accepted (the same manifest), on another collection refused
    train(None, str(tmp_path / "moved"), run, resume=True, log=QUIET, device="cpu")
    with pytest.raises(ValueError, match="is not the dataset the run in"):
        train(None, other, run, resume=True, log=QUIET, device="cpu")


def test_an_old_absolute_dataset_path_is_still_read(root, tmp_path):
    run = str(tmp_path / "old")
    shutil.copytree(root / "dihyfo2", run)
    tensors, conf = read_checkpoint(run)
    data = os.path.abspath(str(root / "data"))
    conf["dataset"] = {k: v for k, v in conf["dataset"].items() if k != "abs_dir"}
    conf["dataset"]["dir"] = conf["data_dir"] = data          # as configs were written before
    save_safetensors_atomic(os.path.join(run, CKPT), tensors, {"format": FORMAT, "config": json.dumps(conf)})
    assert load_hypernet(run, device="cpu").data_dir == data
    # a folder at the recorded place that holds another collection is refused, not used
    conf["dataset"]["dir"] = os.path.abspath(str(root / "other"))
    save_safetensors_atomic(os.path.join(run, CKPT), tensors, {"format": FORMAT, "config": json.dumps(conf)})
    with pytest.raises(ValueError, match="pass the training dataset explicitly"):
        load_hypernet(run, device="cpu")
    assert load_hypernet(run, device="cpu", data=data).data_dir == data
