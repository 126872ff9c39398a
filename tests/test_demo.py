"""The demo runs every stage once, records them, and a re-run redoes none of the finished ones."""
import json
import os

import pytest

from hyforget_fast import demo
from hyforget_fast.collection import collect as collect_mod
from hyforget_fast.hypernet import evaluate as evaluate_mod
from hyforget_fast.unlearn import report as report_mod

QUIET = lambda *_: None  # noqa: E731
SMALL = dict(steps={"dihyfo1": 3, "dihyfo2": 3}, minutes=None, k=4, runs=16, log=QUIET, seeds=(0,),
             collect_kw=dict(block_runs=16, epochs=3, ckpts_per_run=12),
             train_args=("--batch-size", "8", "--width", "32", "--depth", "1", "--heads", "2", "--quiet"),
             align_kw=dict(num_prompts=3, per_prompt=1, steps=2),
             eval_kw=dict(steps=2, retrain_seeds=2, memorization=False, tune=False, relearning=False))


def _boom(*a, **k):
    raise AssertionError("a finished demo stage ran again")


def test_demo_runs_all_stages_then_resumes_without_redoing_them(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "demo")
    demo.run_demo(out, **SMALL)
    stages = json.load(open(os.path.join(out, "stages.json")))
    assert {"collect", "train_dihyfo1", "train_dihyfo2", "align_dihyfo1", "align_dihyfo2", "evaluate"} <= set(stages)
    rep = json.load(open(os.path.join(out, "report", "report.json")))
    assert [r["forget"] for r in rep["runs"]] == [list(f) for f in demo.FORGET_SETS]
    assert rep["holdout"]["forget_set"] == list(demo.HOLDOUT_SET)
    manifest = json.load(open(os.path.join(out, "data", "manifest.json")))
    assert manifest["config"]["holdout"] == [[list(c) for c in r] for r in demo.HOLDOUT]
    assert "| DiHyFo-1 |" in capsys.readouterr().out
    # every stage is recorded: a re-run touches none of them
    for mod, name in ((collect_mod, "collect"), (evaluate_mod, "evaluate_hypernet"),
                      (report_mod, "evaluate_forgetting")):
        monkeypatch.setattr(mod, name, _boom)
    monkeypatch.setattr(demo.subprocess, "Popen", _boom)
    demo.run_demo(out, **SMALL)
    # an interrupted evaluation (stage not recorded) is redone, and only it
    del stages["evaluate"]
    with open(os.path.join(out, "stages.json"), "w") as f:
        json.dump(stages, f)
    with pytest.raises(AssertionError, match="ran again"):
        demo.run_demo(out, **SMALL)
