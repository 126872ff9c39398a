"""`hyforget demo`: forgetting end to end on the bundled digits, both settings of the dissertation,
resumable stage by stage.

For each setting (MNIST-4: 784-2-4, Tables 3.1-3.2; MNIST: 784-7-10, Tables 3.3-3.4):
  1 collect   the setting's checkpoint collection, by the exact command of its model cards, with a
              forget set held out of the store by what the selection rule accepts (the report
              prints the store's count for it: 0)
  2 models    the shipped pretrained DiHyFo-1 and DiHyFo-2 (`hf.load_pretrained`), or with
              train=True (`hyforget demo --train`) both trained from scratch by the cards' train
              commands (one process and one thread each, side by side), then their prompt
              alignment on held-out runs
  3 evaluate  forget every set of the setting's table and the held-out set with both models, their
              controls and every tuned baseline, over 3 seeds (`evaluate_forgetting`). The model to
              forget from is a user's: a classifier trained on every class outside the store
              (`hf.retrain(None, spec, [], splits, seed=USER_SEED)`, a seed the collection never
              used); DiHyFo-1 edits it, and also starts from the best stored checkpoint and from a
              random initialisation (the dissertation's protocol), each its own row
One report: OUT/report/report.md (both settings' tables), OUT/report/<setting>/ (JSON, figures).
Finished stages are recorded in OUT/stages.json and skipped on a re-run; an interrupted stage
resumes (collection and training keep their own progress) or restarts (evaluation).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from .collection.store import write_json_atomic

KINDS = ("dihyfo1", "dihyfo2")
# Held out of MNIST-4 by accuracy: nothing in the store forgets 3 while keeping 0, 1 and 2.
MNIST4_HOLDOUT = "--holdout 3:acc_low:0.2,0:acc_high:0.8,1:acc_high:0.8,2:acc_high:0.8"
# Held out of MNIST: class 3 <= 0.2 while class 2 or class 4 is >= 0.3. A checkpoint the criterion
# accepts for {3} (pooled D_r >= 0.85 over 9 classes of 100 validation digits each) cannot have both
# 2 and 4 below 0.3 (a deficit > 1.35), so the store holds none by construction, while the table's
# {2,3,4} and {0,...,4} (2 and 4 forgotten too) stay in the store.
MNIST10_HOLDOUT = "--holdout 3:acc_low:0.2,2:acc_high:0.3 --holdout 3:acc_low:0.2,4:acc_high:0.3"
SETTINGS = {   # the dissertation's forget sets + a held-out one; D_r threshold of the candidate counts
    "mnist4": dict(forget_sets=((2,), (2, 3), (3,)), heldout=(3,), retain_min=0.95,
                   collect=f"hyforget collect --preset mnist4 --runs 512 {MNIST4_HOLDOUT} --out {{data}} --threads 1 "
                           "--quiet"),
    # MNIST: every run trains on all digits, then forgets 1-5 free classes. The preset's mix (half the
    # runs forget, half the free classes undersampled) holds almost no run that forgets a set the
    # network knew while keeping the rest: nothing for DiHyFo-1 to learn the edit from
    # (bench/forget_pairs.py; bench/RESULTS.md §11).
    "mnist10": dict(forget_sets=((2,), (2, 3, 4), (0, 1, 2, 3, 4), (3,)), heldout=(3,), retain_min=0.85,
                    collect=f"hyforget collect --preset mnist10 --runs 512 --forget-prob 1 --undersample-prob 0 "
                            f"--forget-max-classes 5 {MNIST10_HOLDOUT} --out {{data}} --threads 1 --quiet"),
}
TRAIN = ("hyforget train --model {kind} --data {data} --out {run} --preset tiny --cond adaln --target-repr log "
         "--tokens neuron{extra} --steps {steps} --threads 1 --quiet")
# the release recipes (single-thread CPU; MNIST's 8-token models run ~10-15 steps/s): extra flags and steps.
# MNIST-4's DiHyFo-2 trains with the loss-matching term (TrainConfig.loss_match), which lifted its prompt
# alignment to the store lookup's and made it forget the held-out {3}. On MNIST that term (its losses on
# training images against the validation losses of the conditioning) cost forget-and-keep candidates;
# matched to each network's own losses on the same images (--loss-match-target own), it lifts alignment
# and forgetting together, for both models (bench/RESULTS.md §15, §19, §20).
OWN_LOSS_MATCH = " --loss-match 1 --loss-match-target own"
TRAIN_EXTRA = {"mnist4": {"dihyfo1": " --pair-moved-share 0.5", "dihyfo2": " --loss-match 1"},
               "mnist10": {"dihyfo1": " --pair-moved-share 0.5" + OWN_LOSS_MATCH, "dihyfo2": OWN_LOSS_MATCH}}
STEPS = {"mnist4": {"dihyfo1": 20000, "dihyfo2": 18000}, "mnist10": {"dihyfo1": 20000, "dihyfo2": 24000}}
DEFAULT_SETTINGS = ("mnist4",)   # `--settings mnist4 mnist10` adds the ten-class tables
USER_SEED = 12345        # the user's classifier: trained outside the store (collections use seed 0)
SWEEP_USER_SEEDS = tuple(range(54321, 54328))   # 7 classifiers trained like the user's, for the release sweep: never the demo's own
DIHYFO1_STARTS = ("model", "best", "random")


def _log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def recipe(setting: str, kind: str) -> dict:
    """The release recipe of a model: its card's commands once it ships (`bench/retrain_pretrained.py
    --recipe` retrains a shipped model by the recipe instead)."""
    return {"collect": SETTINGS[setting]["collect"],
            "train": TRAIN.format(kind=kind, steps=STEPS[setting][kind], extra=TRAIN_EXTRA[setting][kind], data="{data}", run="{run}")}


def commands(setting: str) -> dict:
    """{"collect": ..., "dihyfo1": train command, "dihyfo2": ...} of a setting: the shipped cards'
    (the exact commands their weights came from), else the first-release recipe."""
    from .hypernet.pretrained import model_card, pretrained
    cards = {c.name: model_card(c.name)["commands"] for c in pretrained()}
    out = {}
    for kind in KINDS:
        c = cards.get(f"{setting}-{kind}") or recipe(setting, kind)
        out["collect"], out[kind] = c["collect"], c["train"]
    return out


def _cli(cmd: str, extra: tuple = (), **where) -> list[str]:
    argv = shlex.split(cmd.format(**where)) + list(extra)
    if argv[0] != "hyforget":
        raise ValueError(f"not a hyforget command: {cmd!r}")
    return [sys.executable, "-m", "hyforget_fast.cli", *argv[1:]]


def shipped_settings() -> tuple[str, ...]:
    """The settings whose DiHyFo-1 and DiHyFo-2 are both shipped pretrained."""
    from .hypernet.pretrained import pretrained
    names = {c.name for c in pretrained()}
    return tuple(s for s in SETTINGS if all(f"{s}-{kind}" in names for kind in KINDS))


def run_demo(out: str, train: bool = False, settings=None, k: int = 256, seeds=(0, 1, 2),
             threads: int | None = None, log=_log, collect_args: tuple = (), train_args: tuple = (),
             align_kw: dict | None = None, eval_kw: dict | None = None) -> dict:
    """Run (or resume) the demo into `out` -> {setting: report}. train=False uses the shipped
    pretrained hypernetworks; True retrains them by their cards' commands. settings None:
    DEFAULT_SETTINGS that have shipped models (with train=True: every setting). collect_args /
    train_args are appended to those commands and *_kw go to the evaluations (tests shrink the demo)."""
    import torch

    from .hypernet.api import load_hypernet
    from .hypernet.evaluate import evaluate_hypernet, save_evaluation
    from .hypernet.pretrained import load_pretrained
    from .unlearn.report import evaluate_forgetting

    if settings is None:   # the main job: MNIST-4 only, to stay short on a 2-core CPU (README, "What the demo produced")
        settings = tuple(SETTINGS) if train else tuple(s for s in DEFAULT_SETTINGS if s in shipped_settings())
    if not settings:
        raise ValueError("no setting has both hypernetworks shipped; run the demo with --train")
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    sp = os.path.join(out, "stages.json")
    stages = json.load(open(sp)) if os.path.exists(sp) else {}
    t_all = time.perf_counter()

    def done(name, info):
        stages[name] = info
        write_json_atomic(sp, stages)

    reports, n = {}, len(settings)
    for si, setting in enumerate(settings, 1):
        cfg, cmds = SETTINGS[setting], commands(setting)
        data = os.path.join(out, f"{setting}-data")
        if f"collect_{setting}" not in stages:
            log(f"[demo {setting} ({si}/{n}) 1/3] collect {setting} into {data}")
            t0 = time.perf_counter()
            subprocess.run(_cli(cmds["collect"], collect_args, data=data), check=True)
            done(f"collect_{setting}", {"seconds": time.perf_counter() - t0, "command": cmds["collect"]})
        if train:
            hns = _trained(out, setting, cmds, data, stages, done, log, train_args, align_kw, load_hypernet,
                           evaluate_hypernet, save_evaluation)
        else:
            log(f"[demo {setting} ({si}/{n}) 2/3] pretrained DiHyFo-1 and DiHyFo-2 (hf.load_pretrained)")
            hns = {kind: load_pretrained(f"{setting}-{kind}", data=data) for kind in KINDS}
        rep_dir = os.path.join(out, "report", setting)
        if f"evaluate_{setting}" not in stages:
            log(f"[demo {setting} ({si}/{n}) 3/3] forget {[list(f) for f in cfg['forget_sets']]} with DiHyFo-1, "
                f"DiHyFo-2, their controls and every baseline, seeds {list(seeds)}")
            t0 = time.perf_counter()
            user, info = users_model(data, inits=(eval_kw or {}).get("retrain_seeds", 5))
            evaluate_forgetting(data, hns, cfg["forget_sets"], seeds=seeds, k=k, out_dir=rep_dir, log=log,
                                retain_min=cfg["retain_min"], model=user, model_info=info,
                                starts=DIHYFO1_STARTS, **(eval_kw or {}),
                                holdout={"forget_set": list(cfg["heldout"])})
            done(f"evaluate_{setting}", {"seconds": time.perf_counter() - t0})
        reports[setting] = json.load(open(os.path.join(rep_dir, "report.json")))
        reports[setting]["alignment"] = {kind: (stages.get(f"align_{setting}_{kind}") if train else
                                                getattr(hn, "card", {}).get("prompt_alignment"))
                                         for kind, hn in hns.items()}
    if "total_s" not in stages or stages.get("total_settings") != list(settings):
        done("total_s", time.perf_counter() - t_all)
        stages["total_settings"] = list(settings)
        write_json_atomic(sp, stages)
    path = write_combined_report(out, reports, train)
    print(open(path).read())
    return reports


def users_model(data: str, seed: int = USER_SEED, inits: int = 5):
    """The demo's model to forget from: trained on every class of the collection's split, outside
    the store (best of `inits` inits on validation) -> (P,) params, how it was made."""
    from .collection.data import load_splits
    from .collection.store import CheckpointStore
    from .ops.spec import MLPSpec
    from .unlearn.baselines import retrain
    store = CheckpointStore(data, verify="size")
    r = retrain(None, MLPSpec(store.layer_sizes), [], load_splits(store), seeds=inits, seed=seed)
    return r.params, {"source": f"user model: hf.retrain(None, spec, [], splits, seed={seed}) on every class, "
                                f"outside the store (best of {r.hparams['seeds']} inits on validation)",
                      "seed": seed}


def sweep_starts(data: str) -> dict:
    """DiHyFo-1's starts for a release's guidance sweep (`sweep_guidance(starts=)`): the best stored
    checkpoint, and classifiers trained like a user's outside the store (`users_model` at each of
    SWEEP_USER_SEEDS, never the demo's own start). The band of weights that edits a network moves
    from one start to the next; a grid chosen on one start (stored or fresh) can miss another's."""
    return {"best": {"start": "best"},
            **{f"fresh {seed}": {"model": users_model(data, seed=seed)[0]} for seed in SWEEP_USER_SEEDS}}


def _trained(out, setting, cmds, data, stages, done, log, train_args, align_kw, load_hypernet, evaluate_hypernet,
             save_evaluation) -> dict:
    """Train (or resume) both hypernetworks of a setting side by side, then their prompt alignment."""
    todo = [kind for kind in KINDS if f"train_{setting}_{kind}" not in stages]
    if todo:
        # one process and one thread each: on a 2-core CPU that is faster than two 2-thread runs in turn
        t0, procs = time.perf_counter(), {}
        for kind in todo:
            run = os.path.join(out, f"{setting}-{kind}")
            resume = os.path.exists(os.path.join(run, "config.json"))
            log(f"[demo {setting} 2/3] train {kind} -> {run}" + (" (resuming)" if resume else ""))
            procs[kind] = subprocess.Popen(_cli(cmds[kind], (*train_args, *(("--resume",) if resume else ())),
                                                data=data, run=run))
        failed = [kind for kind, p in procs.items() if p.wait() != 0]
        if failed:
            raise RuntimeError(f"training {failed} failed; re-run the demo to resume it")
        for kind in todo:
            done(f"train_{setting}_{kind}", {"seconds": time.perf_counter() - t0, "command": cmds[kind]})
    hns = {kind: load_hypernet(os.path.join(out, f"{setting}-{kind}"), data=data) for kind in KINDS}
    for kind, hn in hns.items():
        if f"align_{setting}_{kind}" not in stages:
            log(f"[demo {setting} 2/3] prompt alignment of {kind} on its held-out runs")
            res = evaluate_hypernet(hn, data, None, **(align_kw or {}))
            save_evaluation(res, os.path.join(out, f"{setting}-{kind}"))
            done(f"align_{setting}_{kind}", {**{k: res[k] for k in ("r2", "r2_free_mean", "pearson", "r2_retrieval",
                                                                     "r2_retrieval_free_mean", "pearson_retrieval")},
                                              "guidance": res["settings"]["guidance"]})
    return hns


TITLES = {"mnist4": "MNIST-4 (784-2-4, pivots {0,1}; dissertation Tables 3.1-3.2)",
          "mnist10": "MNIST (784-7-10, pivots {5..9}; dissertation Tables 3.3-3.4)"}


def _num(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"


def alignment_table(alignment: dict) -> list[str]:
    """Markdown lines: prompt alignment on held-out runs ({kind: {"r2": {class: v}, "pearson": {class:
    v}, "r2_free_mean": v, ...}}) as one table, a row per model and a column per class, 3 decimals.
    A model's record with "r2_retrieval" (the retrieval control of `evaluate_hypernet`) adds a row
    beneath it: the nearest stored training checkpoint on the same prompts. A record's "guidance"
    (the weight it was sampled at) is named in its row."""
    rows = {kind: a for kind, a in alignment.items() if a}
    if not rows:
        return []
    classes = sorted({c for a in rows.values() for c in (a.get("r2") or {})}, key=lambda c: (len(str(c)), str(c)))
    head = ["model"] + [f"R² class {c}" for c in classes] + ["R² free-class mean"] + \
        [f"Pearson class {c}" for c in classes]
    out = ["Prompt alignment on held-out runs (target loss vs the sampled network's loss, per class):", "",
           "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    def row(label, r2, free, pe):
        r2, pe = r2 or {}, pe or {}
        return "| " + " | ".join([label, *(_num(r2.get(c)) for c in classes), _num(free),
                                  *(_num(pe.get(c)) for c in classes)]) + " |"

    for kind, a in rows.items():
        g = a.get("guidance")
        out.append(row(kind if g is None else f"{kind} (guidance {float(g):g})", a.get("r2"), a.get("r2_free_mean"),
                       a.get("pearson")))
        if a.get("r2_retrieval"):
            out.append(row(f"retrieval from the store ({kind}'s prompts)", a["r2_retrieval"],
                           a.get("r2_retrieval_free_mean"), a.get("pearson_retrieval")))
    return out + [""]


def write_combined_report(out: str, reports: dict, train: bool) -> str:
    """OUT/report/report.md: every setting's tables, verdicts and prompt alignment in one file."""
    from .unlearn.report import markdown_tables
    md = ["# HyperForget demo", "",
          "Hypernetworks: " + ("trained from scratch by this run (`hyforget demo --train`)." if train else
                               "the shipped pretrained weights (`hf.pretrained()`; model cards in "
                               "hyforget_fast/pretrained/)."), ""]
    for setting, rep in reports.items():
        md += [f"## {TITLES.get(setting, setting)}", "",
               f"{rep.get('store_size')} stored checkpoints; K = {rep['k']}, {rep['sampler']} {rep['steps']} steps, "
               f"seeds {rep.get('seeds')}; candidate criterion: {rep['criterion']['text']}. Details, JSON and "
               f"figures: report/{setting}/.", ""]
        md += alignment_table(rep.get("alignment") or {})
        md += ["", markdown_tables(rep), "### Verdicts", ""] + [f"- {v}" for v in rep.get("verdicts", [])] + [""]
    path = os.path.join(out, "report", "report.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(md))
    os.replace(tmp, path)
    return path
