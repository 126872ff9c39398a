"""DiHyFo-1's release sweep from more starts, and how well a sampling rule serves a start it never saw.

    python bench/sweep_starts.py add --name mnist10-dihyfo1 --data D --seeds 54324,54325,54326,54327
    python bench/sweep_starts.py held-out --name mnist10-dihyfo1 [--md bench/RESULTS.md]

add: sweeps the card's forget sets from classifiers trained like a user's (`demo.users_model` at each
seed) with the card's own settings (K, seed, weights, levels, validation split), merges their counts
into the card's stored sweep (`sampling.counts_added` says which and when) and applies the rule again;
then `retrain_pretrained.py --remeasure --reuse-sweep` measures the card at the new grids. The seeds
must be those `demo.SWEEP_USER_SEEDS` adds, or the reuse check refuses the sweep.

held-out: leave one start out at a time; choose the grids on the others, with the rule for several
starts (`choose_sampling`: serve the most (set, start) pairs) and with the count rule (the worst set's
expected count, the mean over the starts), and count on the start left out: is it served (a cell of
the grid forgets and keeps from it), and its expected net count. Pure: no sampling.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from hyforget_fast.hypernet import pretrained as P
from hyforget_fast.unlearn.forget import cell_net, choose_sampling, sweep_count_key

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table  # noqa: E402

CHOSEN = ("guidance_grid", "guidance_by_size", "low_levels", "low_levels_by_size", "high_levels",
          "high_levels_by_size", "worst", "rule", "served", "counts_reused")


def grid_count(sweep: dict, key: str, grid, lows, highs) -> tuple[bool, float]:
    """From one stored count key: (does some cell of the grid have a positive net count, K x the
    mean net share over its cells)."""
    nets = [cell_net(sweep["counts"][key], str(float(w)), str(float(q)), str(float(h)))
            for w in grid for q in lows for h in highs]
    return any(x > 0 for x in nets), sweep["k"] * float(np.mean(nets))


def held_out(sweep: dict, default_guidance: float = 1.0) -> dict:
    """Leave-one-start-out over a sweep with several starts and high levels swept.
    -> {rule: [{"set", "start", "served", "count"}]} for rules "served" (several starts) and "count"."""
    if len(sweep.get("starts") or []) < 3 or not sweep.get("highs"):
        raise ValueError("held-out needs a sweep of at least 3 starts with high levels swept")
    base = {k: v for k, v in sweep.items() if k not in CHOSEN}
    sets = sorted({k.split(" from ")[0] for k in sweep["counts"]}, key=lambda s: (len(s.split(",")), s))
    out = {"served": [], "count": []}
    for held in sweep["starts"]:
        rest = [s for s in sweep["starts"] if s != held]
        counts = {k: v for k, v in sweep["counts"].items() if k.split(" from ")[1] != held}
        for rule in out:
            # the count rule is choose_sampling's one-start rule, over the same per-start counts
            ch = choose_sampling({**base, "counts": counts, "starts": rest if rule == "served" else []},
                                 default_guidance)
            for fs in sets:
                n = str(len(fs.split(",")))
                ok, cnt = grid_count(sweep, sweep_count_key(fs.split(","), held), ch["guidance_by_size"][n],
                                     ch["low_levels_by_size"][n], ch["high_levels_by_size"][n])
                out[rule].append({"set": fs, "start": held, "served": ok, "count": cnt})
    return out


def add_starts(name: str, data: str, seeds) -> dict:
    """Sweep the card's sets from fresh starts at `seeds`, merge into its stored sweep, re-choose, write the card."""
    import torch
    from hyforget_fast.collection.store import CheckpointStore
    from hyforget_fast.demo import SETTINGS, users_model
    from hyforget_fast.unlearn.forget import sweep_guidance
    from hyforget_fast.unlearn.report import splits_of
    card = P.model_card(name)
    old = card["sampling"]
    new_labels = [f"fresh {s}" for s in seeds]
    if set(new_labels) & set(old["starts"]):
        raise ValueError(f"the card's sweep already holds {sorted(set(new_labels) & set(old['starts']))}")
    torch.set_num_threads(int(os.environ.get("HYFORGET_THREADS", 1)))
    hn = P.load_pretrained(name, device="cpu", data=data)
    s = SETTINGS[card["setting"]]
    sets = [list(f) for f in s["forget_sets"] if tuple(f) != tuple(s["heldout"])]
    t0 = time.perf_counter()
    starts = {label: {"model": users_model(data, seed=seed)[0]} for label, seed in zip(new_labels, seeds)}
    new = sweep_guidance(hn, splits_of(CheckpointStore(data)), sets, weights=old["weights"], lows=old["lows"],
                         highs=old["highs"], k=old["k"], sampler=old["sampler"], steps=old["steps"], seed=old["seed"],
                         retain_min=s["retain_min"], starts=starts)
    card["sampling"] = merge_sweeps(old, {**new, "seconds": time.perf_counter() - t0}, hn.default_guidance)
    P.write_card(os.path.join(P.PRETRAINED_DIR, name), card)
    return card["sampling"]


def merge_sweeps(old: dict, new: dict, default_guidance: float, date: str | None = None) -> dict:
    """A stored sweep with another sweep's starts added (same K, seed, sampler, steps, weights, levels
    and split, else ValueError), the rule applied again (`choose_sampling`)."""
    same = ("k", "seed", "sampler", "steps", "weights", "lows", "highs", "split")
    diff = [k for k in same if old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"the sweeps differ in {diff}: their counts cannot be merged")
    if set(old["starts"]) & set(new["starts"]):
        raise ValueError(f"both sweeps hold {sorted(set(old['starts']) & set(new['starts']))}")
    merged = {k: v for k, v in old.items() if k not in CHOSEN}
    merged.update(counts={**old["counts"], **new["counts"]}, starts=old["starts"] + new["starts"],
                  seconds=round(old.get("seconds", 0.0) + new.get("seconds", 0.0), 1),
                  counts_added=(old.get("counts_added") or []) + [
                      {"starts": new["starts"], "date": date or time.strftime("%Y-%m-%d"),
                       "how": "swept later with the same hypernetwork, validation split, K, seed, weights and levels"}])
    return choose_sampling(merged, default_guidance)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a_add = sub.add_parser("add", help="sweep more fresh starts into a card's stored sweep")
    a_add.add_argument("--name", required=True)
    a_add.add_argument("--data", required=True, help="the card's collection (or a rebuild of it)")
    a_add.add_argument("--seeds", required=True, help="comma-separated users_model seeds")
    a_ho = sub.add_parser("held-out", help="leave-one-start-out over a card's stored sweep")
    a_ho.add_argument("--name", required=True)
    a_ho.add_argument("--md", help="append the table to this markdown file")
    a = ap.parse_args(argv)
    if a.cmd == "add":
        got = add_starts(a.name, a.data, [int(x) for x in a.seeds.split(",")])
        print(json.dumps({k: got[k] for k in ("guidance_by_size", "low_levels_by_size", "high_levels_by_size",
                                              "served")}))
        return 0
    res = held_out(P.model_card(a.name)["sampling"])
    rows = []
    for rule, rs in res.items():
        for fs in sorted({r["set"] for r in rs}, key=lambda s: (len(s.split(",")), s)):
            mine = [r for r in rs if r["set"] == fs]
            rows.append([rule, "{" + fs + "}", f"{sum(r['served'] for r in mine)} / {len(mine)}",
                         " ".join(f"{r['count']:.0f}" for r in mine)])
        rows.append([rule, "all", f"{sum(r['served'] for r in rs)} / {len(rs)}",
                     f"mean {np.mean([r['count'] for r in rs]):.1f}"])
    table = markdown_table(["rule", "set", "held-out starts served", "net count from each held-out start"], rows)
    print(table)
    if a.md:
        with open(a.md, "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
