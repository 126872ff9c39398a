"""The demo runs every stage once per setting, records them, and a re-run redoes none of the finished
ones; the default path uses the shipped pretrained hypernetworks, --train the cards' commands."""
import json
import os

import pytest

import hyforget_fast as hf
from hyforget_fast import demo
from hyforget_fast.hypernet import evaluate as evaluate_mod
from hyforget_fast.unlearn import report as report_mod

QUIET = lambda *_: None  # noqa: E731
TINY_COLLECT = ("--runs", "16", "--block-runs", "16", "--epochs", "3", "--ckpts-per-run", "12")
EVAL = dict(steps=2, retrain_seeds=2, memorization=False, tune=False, relearning=False)
TRAINED = dict(train=True, settings=("mnist4",), k=4, seeds=(0,), log=QUIET, collect_args=TINY_COLLECT,
               train_args=("--steps", "3", "--batch-size", "8", "--width", "32", "--depth", "1", "--heads", "2"),
               align_kw=dict(num_prompts=3, per_prompt=1, steps=2), eval_kw=EVAL)


def _boom(*a, **k):
    raise AssertionError("a finished demo stage ran again")


def test_demo_trains_runs_all_stages_then_resumes_without_redoing_them(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "demo")
    demo.run_demo(out, **TRAINED)
    stages = json.load(open(os.path.join(out, "stages.json")))
    assert {"collect_mnist4", "train_mnist4_dihyfo1", "train_mnist4_dihyfo2", "align_mnist4_dihyfo1",
            "align_mnist4_dihyfo2", "evaluate_mnist4"} <= set(stages)
    cmds = demo.commands("mnist4")
    assert stages["collect_mnist4"]["command"] == cmds["collect"] and stages["train_mnist4_dihyfo2"]["command"] == \
        cmds["dihyfo2"]
    rep = json.load(open(os.path.join(out, "report", "mnist4", "report.json")))
    assert [r["forget"] for r in rep["runs"]] == [list(f) for f in demo.SETTINGS["mnist4"]["forget_sets"]]
    assert rep["holdout"]["forget_set"] == [3] and rep["criterion"]["retain_min"] == 0.95
    manifest = json.load(open(os.path.join(out, "mnist4-data", "manifest.json")))
    assert manifest["config"]["holdout"] == [[[3, "acc_low", 0.2], [0, "acc_high", 0.8], [1, "acc_high", 0.8],
                                              [2, "acc_high", 0.8]]]
    md = open(os.path.join(out, "report", "report.md")).read()
    assert "MNIST-4" in md and "| DiHyFo-1 |" in md and "trained from scratch" in md
    assert "| DiHyFo-1 |" in capsys.readouterr().out
    # every stage is recorded: a re-run touches none of them
    monkeypatch.setattr(evaluate_mod, "evaluate_hypernet", _boom)
    monkeypatch.setattr(report_mod, "evaluate_forgetting", _boom)
    monkeypatch.setattr(demo.subprocess, "Popen", _boom)
    monkeypatch.setattr(demo.subprocess, "run", _boom)
    demo.run_demo(out, **TRAINED)
    # an interrupted evaluation (stage not recorded) is redone, and only it
    del stages["evaluate_mnist4"]
    with open(os.path.join(out, "stages.json"), "w") as f:
        json.dump(stages, f)
    with pytest.raises(AssertionError, match="ran again"):
        demo.run_demo(out, **TRAINED)


def test_demo_default_uses_the_pretrained_models(tmp_path, monkeypatch):
    calls = []
    real = demo.subprocess.Popen

    def spy(argv, *a, **kw):                                          # every command the demo starts
        calls.append(argv)
        return real(argv, *a, **kw)

    monkeypatch.setattr(demo.subprocess, "Popen", spy)
    out = str(tmp_path / "demo")
    reps = demo.run_demo(out, settings=("mnist4",), k=4, seeds=(0,), log=QUIET, collect_args=TINY_COLLECT,
                         eval_kw=EVAL)
    data = os.path.join(out, "mnist4-data")                          # only the card's collection, no training
    assert calls == [demo._cli(hf.load_pretrained("mnist4-dihyfo2").card["commands"]["collect"], TINY_COLLECT,
                               data=data)]
    rep = reps["mnist4"]
    assert {"dihyfo1", "dihyfo2", "dihyfo1:keep", "dihyfo2:keep", "store", "retrieval"} <= set(rep["runs"][0]["methods"])
    assert rep["alignment"]["dihyfo2"]["r2_free_mean"] is not None    # from the model card
    assert "pretrained weights" in open(os.path.join(out, "report", "report.md")).read()


def test_demo_runs_the_ten_class_setting_end_to_end(tmp_path):
    """MNIST (784-7-10): collect -> train DiHyFo-1/2 -> forget {2}, {2,3,4}, {0,...,4} and the held-out
    {3} -> report, by the same commands the shipped models use (shrunk for the test)."""
    out = str(tmp_path / "demo10")
    reps = demo.run_demo(out, **{**TRAINED, "settings": ("mnist10",)})
    rep = reps["mnist10"]
    assert [r["forget"] for r in rep["runs"]] == [[2], [2, 3, 4], [0, 1, 2, 3, 4], [3]]
    assert rep["criterion"]["retain_min"] == 0.85 and rep["classes"] == list(range(10))
    manifest = json.load(open(os.path.join(out, "mnist10-data", "manifest.json")))
    assert manifest["config"]["holdout"] == [[[3, "acc_low", 0.2], [2, "acc_high", 0.3]],
                                             [[3, "acc_low", 0.2], [4, "acc_high", 0.3]]]
    # the release's run mix: every run trains on all digits, then forgets 1-5 free classes
    cfg = manifest["config"]
    assert (cfg["forget_prob"], cfg["undersample_prob"], cfg["forget_max_classes"]) == (1.0, 0.0, 5)
    held = rep["summary"]["3"]["store"]["forget_keep"]
    assert held[0] == 0                                   # held out by construction: no acceptable checkpoint
    md = open(os.path.join(out, "report", "report.md")).read()
    assert "MNIST (784-7-10" in md and "D_f = {0,1,2,3,4}" in md and "against the dissertation" in md
