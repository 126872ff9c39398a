"""`hyforget demo`: the whole pipeline on the bundled digits, resumable stage by stage.

  1 collect   MNIST-4 (mnist4 preset), with forgetting {3} held out of the store by what the
              selection rule accepts: no stored checkpoint has class-3 validation accuracy <= 0.2
              while classes 0, 1, 2 are >= 0.8 (the report prints the store's count: 0)
  2 train     a tiny DiHyFo-1 and a tiny DiHyFo-2 (each resumes exactly after an interruption)
  3 align     prompt-alignment R² of each on its held-out runs (hypernet/evaluate.py)
  4 evaluate  forget {2}, {2,3} and the held-out {3} with both models, their controls and every
              (tuned) baseline, over 3 seeds
Finished stages are recorded in OUT/stages.json and skipped on a re-run; an interrupted stage
resumes (collection and training keep their own progress) or restarts (evaluation).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .collection.store import write_json_atomic

# Held out by accuracy (SPEC §7): nothing in the store forgets 3 while keeping 0, 1 and 2.
HOLDOUT = (((3, "acc_low", 0.2), (0, "acc_high", 0.8), (1, "acc_high", 0.8), (2, "acc_high", 0.8)),)
FORGET_SETS = ((2,), (2, 3), (3,))
HOLDOUT_SET = (3,)


def _log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


STEPS = {"dihyfo1": 3500, "dihyfo2": 4500}   # ~15 min each at one thread, both at once, on the 2-core CPU


def run_demo(out: str, steps: dict | None = None, minutes: float | None = 15.0, k: int = 256, seeds=(0, 1, 2),
             runs: int = 512, threads: int | None = None, log=_log, collect_kw: dict | None = None,
             train_args: tuple = (), align_kw: dict | None = None, eval_kw: dict | None = None) -> dict:
    """Run (or resume) the demo into `out`. The *_kw / train_args knobs shrink it for tests."""
    import torch

    from .collection.collect import collect, preset
    from .hypernet.api import load_hypernet
    from .hypernet.evaluate import evaluate_hypernet, save_evaluation
    from .unlearn.report import evaluate_forgetting, markdown_tables

    steps = {**STEPS, **(steps or {})}
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    sp = os.path.join(out, "stages.json")
    stages = json.load(open(sp)) if os.path.exists(sp) else {}

    def done(name, info):
        stages[name] = info
        write_json_atomic(sp, stages)

    data = os.path.join(out, "data")
    if "collect" not in stages:
        log(f"[demo 1/4] collect MNIST-4 into {data} (held out: {HOLDOUT})")
        t0 = time.perf_counter()
        man = collect(preset("mnist4", runs=runs, holdout=HOLDOUT, **(collect_kw or {})), data, log=log)
        done("collect", {"seconds": time.perf_counter() - t0, "checkpoints": man["num_checkpoints"]})
    todo = [kind for kind in ("dihyfo1", "dihyfo2") if f"train_{kind}" not in stages]
    if todo:
        # Both hypernetworks train at once, one process and one thread each: on a 2-core CPU that is
        # faster than two 2-thread runs one after the other (small matmuls scale poorly to 2 threads).
        t0 = time.perf_counter()
        procs = {}
        for kind in todo:
            d = os.path.join(out, kind)
            resume = os.path.exists(os.path.join(d, "config.json"))
            log(f"[demo 2/4] train tiny {kind} -> {d}" + (" (resuming)" if resume else ""))
            cmd = [sys.executable, "-m", "hyforget_fast.cli", "train", "--model", kind, "--data", data, "--out", d,
                   "--preset", "tiny", "--steps", str(steps[kind]), "--threads", "1", "--log-every", "250",
                   *train_args]
            cmd += ["--minutes", str(minutes)] if minutes else []
            cmd += ["--resume"] if resume else []
            procs[kind] = subprocess.Popen(cmd)
        failed = [k for k, p in procs.items() if p.wait() != 0]
        if failed:
            raise RuntimeError(f"training {failed} failed; re-run the demo to resume it")
        for kind in todo:
            done(f"train_{kind}", {"seconds": time.perf_counter() - t0, "steps": steps[kind], "minutes": minutes})
    hns = {kind: load_hypernet(os.path.join(out, kind)) for kind in ("dihyfo1", "dihyfo2")}
    for kind, hn in hns.items():
        if f"align_{kind}" not in stages:
            log(f"[demo 3/4] prompt alignment of {kind} on its held-out runs")
            t0 = time.perf_counter()
            res = evaluate_hypernet(hn, data, None, **(align_kw or {}))
            save_evaluation(res, os.path.join(out, kind))
            done(f"align_{kind}", {"seconds": time.perf_counter() - t0, "r2": res["r2"],
                                   "r2_free_mean": res["r2_free_mean"], "pearson": res["pearson"]})
    rep_dir = os.path.join(out, "report")
    if "evaluate" not in stages:
        log(f"[demo 4/4] forget {list(map(list, FORGET_SETS))} with DiHyFo-1, DiHyFo-2 and every baseline")
        t0 = time.perf_counter()
        rep = evaluate_forgetting(data, hns, FORGET_SETS, seeds=seeds, k=k, out_dir=rep_dir, log=log, **(eval_kw or {}),
                                  holdout={"rules": [list(map(list, r)) for r in HOLDOUT],
                                           "forget_set": list(HOLDOUT_SET)})
        done("evaluate", {"seconds": time.perf_counter() - t0})
    else:
        rep = json.load(open(os.path.join(rep_dir, "report.json")))
    print(markdown_tables(rep))
    for v in rep.get("verdicts", []):
        print(f"- {v}")
    for kind in hns:
        a = stages.get(f"align_{kind}", {})
        print(f"{kind}: prompt alignment R² {a.get('r2')} (free-class mean {a.get('r2_free_mean')})")
    print(f"report: {rep_dir}/report.md")
    return rep
