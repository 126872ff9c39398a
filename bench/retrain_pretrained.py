"""Retrain shipped hypernetworks from their cards' commands and rewrite weights and card together.

  python bench/retrain_pretrained.py --name mnist4-dihyfo2 --reason "adaLN-Zero conditioning" [--work DIR]
  python bench/retrain_pretrained.py --all --reason "..."
  python bench/retrain_pretrained.py --name mnist4-dihyfo1 --remeasure --reason "guidance grid per request size"
  python bench/retrain_pretrained.py --name mnist10-dihyfo1 --recipe --jobs 2 --reason "..."   # measure on 2 cores

For each model: run the card's `collect` command (skipped when its collection exists), its `train`
command (resumed when interrupted), then measure what the card records: prompt alignment on the
run's held-out runs (`evaluate_hypernet`), the conditioning controls and forgetting table of the
setting's forget sets over 3 seeds (`evaluate_forgetting`, this model only, baselines untuned),
and one small forget request (`check`) that tests/test_pretrained.py reproduces. The EMA weights
go to hyforget_fast/pretrained/<name>/ with the card; the card records why it was retrained.
A model without a card yet takes its commands from RECIPES below (the first release).
Commands use {data} and {run} for folders under --work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

from hyforget_fast.collection.store import CheckpointStore
from hyforget_fast.demo import KINDS, SETTINGS, _cli, recipe, sweep_starts
from hyforget_fast.hypernet import pretrained as P
from hyforget_fast.hypernet.api import load_hypernet
from hyforget_fast.hypernet.checkpoint import manifest_sha256
from hyforget_fast.hypernet.evaluate import evaluate_hypernet
from hyforget_fast.unlearn.forget import (SWEEP_HIGH_LEVELS, SWEEP_LOW_LEVELS, SWEEP_WEIGHTS, best_checkpoint,
                                         choose_sampling, forget, sweep_count_key, sweep_guidance)
from hyforget_fast.unlearn.report import evaluate_forgetting, splits_of, verdicts

RECIPES = {f"{s}-{k}": {"setting": s, "kind": k} for s in SETTINGS for k in KINDS}


def machine() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"


def commands_for(name: str, use_recipe: bool = False) -> dict:
    """The card's commands; the package's release recipe (`demo.recipe`) for a model without a
    card yet, or when asked (a new release recipe)."""
    if not use_recipe:
        try:
            return P.model_card(name)["commands"]
        except ValueError:
            pass
    return recipe(*name.split("-", 1))


def release_sweep(hn, setting: str, data: str, k: int = 256, reuse: dict | None = None, jobs: int = 1) -> dict:
    """The model's default guidance grid and prompt levels, chosen on VALIDATION over the setting's forget sets that
    are not held out (`sweep_guidance`; DiHyFo-1 from each of `demo.sweep_starts`: the best stored
    checkpoint and freshly trained classifiers, split among `jobs` processes)."""
    s = SETTINGS[setting]
    sets = [list(f) for f in s["forget_sets"] if tuple(f) != tuple(s["heldout"])]
    starts = sweep_starts(data) if hn.kind == "dihyfo1" else None
    same = reuse and (reuse.get("k"), reuse.get("weights"), reuse.get("lows"), reuse.get("highs"),
                      reuse.get("starts") or [], sorted(reuse.get("counts") or [])) == (
        k, list(SWEEP_WEIGHTS), list(SWEEP_LOW_LEVELS), list(SWEEP_HIGH_LEVELS), list(starts or []),
        sorted(sweep_count_key(f, label) for f in sets for label in (starts or [""])))
    if same:   # the stored counts of the same sweep: only the rule is applied again
        return {**choose_sampling(reuse, hn.default_guidance), "counts_reused": True}
    if reuse:
        raise ValueError("the card's stored sweep is not the one this release runs (weights, levels, starts or sets "
                         "differ): re-measure without --reuse-sweep")
    t0 = time.perf_counter()
    if starts and jobs > 1:
        out = parallel_sweep(hn, data, sets, starts, jobs, k=k, retain_min=s["retain_min"])
    else:
        out = sweep_guidance(hn, splits_of(CheckpointStore(data)), sets, k=k, retain_min=s["retain_min"],
                             **({"starts": starts} if starts else {}))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _sweep_part(hn, data: str, sets, starts: dict, kw: dict) -> dict:
    torch.set_num_threads(1)
    return sweep_guidance(hn, splits_of(CheckpointStore(data)), sets, starts=starts, **kw)


def parallel_sweep(hn, data: str, sets, starts: dict, jobs: int, **kw) -> dict:
    """`sweep_guidance` over several starts, the starts split among `jobs` single-thread processes.
    Every start is swept with the same seed whatever else is swept beside it, so the merged counts are
    the serial sweep's; the rule is applied once, to all of them (`choose_sampling`)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    labels = list(starts)
    jobs = min(int(jobs), len(labels) // 2)    # >= 2 starts per part: its count keys then name the start
    if jobs < 2:
        return sweep_guidance(hn, splits_of(CheckpointStore(data)), sets, starts=starts, **kw)
    parts = [{lab: starts[lab] for lab in labels[i::jobs]} for i in range(jobs)]
    with ProcessPoolExecutor(jobs - 1, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_sweep_part, hn, data, sets, part, kw) for part in parts[1:]]
        outs = [_sweep_part(hn, data, sets, parts[0], kw)] + [f.result() for f in futures]
    merged = {key: outs[0][key] for key in ("weights", "lows", "highs", "k", "steps", "sampler", "seed", "split")}
    found = {key: c for o in outs for key, c in o["counts"].items()}
    merged["counts"] = {sweep_count_key(f, lab): found[sweep_count_key(f, lab)] for f in sets for lab in labels}
    merged["starts"] = labels
    return choose_sampling(merged, hn.default_guidance)


CLOSED_LOOP_WEIGHTS = (1.0, 1.5, 2.0)   # one refinement edit moves the rest of the way: low weights suffice
ALIGNMENT_KEYS = ("r2", "pearson", "r2_free_mean", "pearson_free_mean", "r2_retrieval", "pearson_retrieval",
                  "r2_retrieval_free_mean", "settings")


def alignment(hn, data: str, grid, heldout_runs=None, seeds=(0, 1, 2)) -> dict:
    """Prompt alignment (`evaluate_hypernet`) at guidance 1 (the plain conditional model) and at
    each weight of the grid; the headline numbers are the grid's first weight's. DiHyFo-1 also in
    closed loop (`refine=1`: feedback on one validation half, scored on the other) at
    CLOSED_LOOP_WEIGHTS, each over evaluation `seeds` (a single seed's R² moves by about 0.1).
    heldout_runs: given for a rebuild of the training collection (`remeasure`), else the model's own."""
    per = {}
    for w in sorted({1.0, *map(float, grid)}):
        a = evaluate_hypernet(hn, data, heldout_runs, guidance=w)
        per[str(w)] = {k: a[k] for k in ALIGNMENT_KEYS}
    first = per[str(float(grid[0]))]
    out = {**{k: v for k, v in first.items() if k != "settings"}, "guidance": float(grid[0]), "per_guidance": per}
    if hn.kind == "dihyfo1":
        closed = {}
        for w in CLOSED_LOOP_WEIGHTS:
            runs = [evaluate_hypernet(hn, data, heldout_runs, guidance=w, refine=1, seed=s) for s in seeds]
            closed[str(w)] = {"r2_free_mean_per_seed": [r["r2_free_mean"] for r in runs],
                              "r2_free_mean": float(np.mean([r["r2_free_mean"] for r in runs])),
                              "pearson_free_mean": float(np.mean([r["pearson_free_mean"] for r in runs])),
                              "seeds": list(seeds), "settings": runs[0]["settings"]}
        out["closed_loop"] = {"refine": 1, "per_guidance": closed}
    return out


def _timed_alignment(hn, data: str, grid, heldout_runs=None, threads: int | None = None) -> tuple[dict, float]:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    return alignment(hn, data, grid, heldout_runs), time.perf_counter() - t0


def run(cmd: str, **where) -> None:
    subprocess.run(_cli(cmd, **where), check=True)


def measure(hn, name: str, data: str, seeds=(0, 1, 2), k: int = 256, heldout_runs=None,
            reuse_sweep: dict | None = None, jobs: int = 1) -> dict:
    """What a card records of a model's weights, on its collection `data`: the guidance grids
    chosen on validation (`sampling`), prompt alignment at them, the forgetting table over 3 seeds
    with its controls, and the small `check` request (with the start it used, for DiHyFo-1).
    jobs > 1: single-thread processes share the work (the sweep's starts; the alignment beside the
    forgetting table); the numbers are one process's, up to float rounding in the alignment."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    setting, kind = name.split("-", 1)
    s = SETTINGS[setting]
    torch.set_num_threads(int(os.environ.get("HYFORGET_THREADS", max(1, os.cpu_count() or 1))))
    sampling = release_sweep(hn, setting, data, k=k, reuse=reuse_sweep, jobs=jobs)
    hn.meta["sampling"] = sampling                      # what forget() spreads its candidates over
    def forgetting_table():
        return evaluate_forgetting(data, {kind: hn}, [list(f) for f in s["forget_sets"]], seeds=seeds, k=k, tune=False,
                                   memorization=False, relearning=False, retain_min=s["retain_min"],
                                   holdout={"forget_set": list(s["heldout"])}, log=lambda *_: None)
    if jobs > 1:
        torch.set_num_threads(1)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:   # the alignment beside the table
            aligned = pool.submit(_timed_alignment, hn, data, sampling["guidance_grid"], heldout_runs, 1)
            rep = forgetting_table()
            align, t_align = aligned.result()
    else:
        align, t_align = _timed_alignment(hn, data, sampling["guidance_grid"], heldout_runs)
        rep = forgetting_table()
    keep = (kind, f"{kind}:keep", f"{kind}:uncond", "retrain", "store")
    table = {key: {m: v for m, v in meths.items() if m in keep} for key, meths in rep["summary"].items()}
    fs = list(s["forget_sets"][0])
    start, _ = best_checkpoint(data, hn.heldout_runs) if kind == "dihyfo1" else (None, None)
    check_kw = dict(k=32, sampler="ddim", steps=10, seed=0)
    res = forget(hn, fs, splits_of(CheckpointStore(data)), model=start, **check_kw)
    card = {"sampling": sampling,
            "prompt_alignment": {**align, "seconds": round(t_align, 1)},
            "forgetting": {"k": k, "sampler": "ddim", "steps": 50, "seeds": list(seeds), "criterion": rep["criterion"],
                           "heldout": list(s["heldout"]), "summary": table,
                           "verdicts": [v for v in verdicts(rep) if "DiHyFo" in v or "held out" in v]},
            "check": {"forget": fs, **check_kw, "guidance_grid": res.settings["guidance_grid"],
                      "start": "best stored checkpoint" if start is not None else None,
                      "chosen": res.chosen, "val_forget_acc": float(res.candidates["forget_acc"][res.chosen]),
                      "val_retain_acc": float(res.candidates["retain_acc"][res.chosen]),
                      "val_class_loss": [float(x) for x in res.candidates["class_loss"][res.chosen]],
                      "forget_keep": res.candidates["forget_keep"]}}
    return card, start


def collection(name: str, work: str, use_recipe: bool = False) -> str:
    """The model's collection under `work`, made by its collect command when missing."""
    data = os.path.join(work, f"{name.split('-', 1)[0]}-data")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        run(commands_for(name, use_recipe)["collect"], data=data, run="")
    return data


REBUILD_SIZE_TOLERANCE = 0.01   # a rebuild of a card's collection on another CPU: its size within 1 %


def remeasure(name: str, reason: str, work: str, reuse_sweep: bool = False, jobs: int = 1) -> dict:
    """Keep a shipped model's weights; re-measure everything its card records of them (`measure`:
    a changed sampling rule changes the grid, the tables and the check together)."""
    data = collection(name, work)
    hn = P.load_pretrained(name, device="cpu", data=data)
    old = P.model_card(name)
    # The card's collect command rebuilds the training collection run for run (same seeds, so the
    # held-out run ids name the same runs), but on another CPU its floats, and so its manifest
    # hash, may differ: then the held-out runs are passed by id, and the card says so. Those float
    # differences also move a few checkpoints across the collection's loss-bin caps and accuracy
    # hold-outs (47,563 against 47,628 for mnist10 on two EPYC machines), so a rebuild may differ in
    # size by up to REBUILD_SIZE_TOLERANCE; more than that is another collection.
    want, got = old["dataset"]["manifest_sha256"], manifest_sha256(data)
    n, n_card = CheckpointStore(data, verify="size").manifest["num_checkpoints"], old["dataset"]["num_checkpoints"]
    if got != want and abs(n - n_card) > REBUILD_SIZE_TOLERANCE * n_card:
        raise ValueError(f"{data} is not a rebuild of {name}'s collection: {n} checkpoints, the card's {n_card}")
    new, start = measure(hn, name, data, heldout_runs=hn.heldout_runs if got != want else None,
                         reuse_sweep=old.get("sampling") if reuse_sweep else None, jobs=jobs)
    card = {**old, **new, "remeasured": {"date": time.strftime("%Y-%m-%d"), "reason": reason, "machine": machine(),
                                         "collection_manifest_sha256": got, "collection_checkpoints": n,
                                         "collection": "the training collection" if got == want else
                                         "a rebuild by the card's collect command (same runs; floats differ by CPU)"}}
    card = P.write_card(os.path.join(P.PRETRAINED_DIR, name), card, start)   # the check's start with it
    print(json.dumps({"name": name, "sampling": {k_: new["sampling"][k_] for k_ in ("guidance_grid", "guidance_by_size", "low_levels_by_size",
                                                                    "high_levels_by_size")},
                      "check": new["check"]}, indent=1))
    return card


def retrain(name: str, reason: str, work: str, seeds=(0, 1, 2), k: int = 256, use_recipe: bool = False,
            jobs: int = 1) -> dict:
    setting, kind = name.split("-", 1)
    cmds = commands_for(name, use_recipe)
    data, run_dir = collection(name, work, use_recipe), os.path.join(work, name)
    train_cmd = cmds["train"] + (" --resume" if os.path.exists(os.path.join(run_dir, "config.json")) else "")
    run(train_cmd, data=data, run=run_dir)
    hn = load_hypernet(run_dir, device="cpu", data=data)
    measured, start = measure(hn, name, data, seeds=seeds, k=k, jobs=jobs)
    conf = json.load(open(os.path.join(run_dir, "config.json")))
    card = {"name": name, "setting": setting, "kind": kind,
            "commands": cmds, "reason": reason, "date": time.strftime("%Y-%m-%d"),
            "dataset": {k_: conf["dataset"].get(k_) for k_ in ("layer_sizes", "classes", "pivots", "num_checkpoints",
                                                                 "manifest_sha256", "split")},
            "training": {"steps": conf["step"], "wall_time_s": round(conf["wall_time_s"], 1), "machine": machine(),
                         "train_config": conf["train"], "model_config": conf["model"]},
            "storage": {"dtype": "float32"}, **measured}
    P.export_pretrained(run_dir, os.path.join(P.PRETRAINED_DIR, name), card, start=start)
    print(json.dumps({k_: card[k_] for k_ in ("name", "training", "check")}, indent=1, default=str))
    return card


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", action="append", help="a shipped model (repeatable); see hf.pretrained()")
    ap.add_argument("--all", action="store_true", help="every model of RECIPES")
    ap.add_argument("--reason", required=True, help="why the weights or the card change (recorded in the card)")
    ap.add_argument("--remeasure", action="store_true",
                    help="keep the weights; re-measure what the card records of them (guidance grids, alignment, "
                         "forgetting table, check)")
    ap.add_argument("--reuse-sweep", action="store_true",
                    help="with --remeasure: apply the sampling rule again to the counts the card's sweep stored (the "
                         "same weights, levels, starts and sets) instead of sampling them again")
    ap.add_argument("--work", default="runs/pretrained", help="folder for the collections and training runs")
    ap.add_argument("--recipe", action="store_true",
                    help="train with the package's release recipe (hyforget_fast.demo.recipe), not the card's commands")
    ap.add_argument("--jobs", type=int, default=1,
                    help="measure with this many single-thread processes (DiHyFo-1's sweep starts split among them; "
                         "the alignment beside the forgetting table); training stays one process")
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    names = sorted(RECIPES) if a.all else (a.name or [])
    if not names:
        ap.error("name a model (--name) or --all")
    for n in names:
        if n not in RECIPES:
            ap.error(f"unknown model {n!r}; known: {sorted(RECIPES)}")
        if a.remeasure:
            remeasure(n, a.reason, a.work, reuse_sweep=a.reuse_sweep, jobs=a.jobs)
        else:
            retrain(n, a.reason, a.work, use_recipe=a.recipe, jobs=a.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
