"""Figures of a hypernetwork: learning curves and prompt alignment (observed vs target loss).

Both functions take plain JSON-like data (an evaluation result dict, a list of curve records),
draw with matplotlib's Agg backend (no display needed) and return the PNG path.
"""
from __future__ import annotations

import math

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _num(v) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else float("nan")


def _with_r2(rec: dict) -> dict:
    """Training-loop records keep evaluation scalars flat under "eval" ({"r2/2": .., "r2_free_mean":
    ..}); lift them to "r2" {class: R²} and "r2_free_mean"."""
    ev = rec.get("eval")
    if not isinstance(ev, dict) or rec.get("r2"):
        return rec
    r2 = {k.split("/", 1)[1]: v for k, v in ev.items() if k.startswith("r2/")}
    out = {**rec, "r2": r2}
    if "r2_free_mean" in ev:
        out["r2_free_mean"] = ev["r2_free_mean"]
    return out


def plot_learning_curves(curves: list, out_png: str) -> str:
    """curves: records {"step", "loss"?, "lr"?, "grad_norm"?, "r2"?: {class: R²}, "r2_free_mean"?}
    or the training loop's {"step", ..., "eval": {"r2/<class>": R², "r2_free_mean": ..}} (R² only
    on evaluation steps). Panels: loss vs step (log y); grad norm and lr; R² per class
    vs step when any record has one."""
    if isinstance(curves, dict) and "curves" in curves:
        curves = curves["curves"]
    if not isinstance(curves, list) or not all(isinstance(r, dict) and "step" in r for r in curves):
        raise ValueError("learning curves must be a list of records with a 'step' key")
    plt = _plt()
    curves = [_with_r2(r) for r in curves]
    has_r2 = any(r.get("r2") for r in curves)
    fig, axes = plt.subplots(1, 3 if has_r2 else 2, figsize=(13 if has_r2 else 9, 3.4), squeeze=False)
    ax = axes[0][0]
    pts = [(r["step"], _num(r["loss"])) for r in curves if "loss" in r]
    if pts:
        s, v = np.array(pts).T
        ax.plot(s, v, lw=0.8, color="tab:blue")
        if np.nanmin(v) > 0:
            ax.set_yscale("log")
    ax.set_xlabel("step"), ax.set_ylabel("training MSE"), ax.set_title("loss", fontsize=9)
    ax = axes[0][1]
    g = [(r["step"], _num(r["grad_norm"])) for r in curves if "grad_norm" in r]
    if g:
        s, v = np.array(g).T
        ax.plot(s, v, lw=0.8, color="tab:orange", label="grad norm")
        if np.nanmin(v) > 0:
            ax.set_yscale("log")
        ax.set_ylabel("grad norm")
    lr = [(r["step"], _num(r["lr"])) for r in curves if "lr" in r]
    if lr:
        s, v = np.array(lr).T
        ax2 = ax.twinx()
        ax2.plot(s, v, lw=0.8, color="tab:green")
        ax2.set_ylabel("learning rate", color="tab:green")
    ax.set_xlabel("step"), ax.set_title("grad norm / lr", fontsize=9)
    if has_r2:
        ax = axes[0][2]
        ev = [r for r in curves if r.get("r2")]
        labels = sorted({str(c) for r in ev for c in r["r2"]}, key=lambda x: (len(x), x))
        for lab in labels:
            pts = [(r["step"], _num({str(k): v for k, v in r["r2"].items()}.get(lab))) for r in ev]
            s, v = np.array(pts).T
            ax.plot(s, v, marker="o", ms=3, lw=0.8, label=f"class {lab}")
        fm = [(r["step"], _num(r["r2_free_mean"])) for r in ev if "r2_free_mean" in r]
        if fm:
            s, v = np.array(fm).T
            ax.plot(s, v, color="k", lw=1.5, ls="--", label="free mean")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_ylim(max(-1.0, ax.get_ylim()[0]), 1.05)
        ax.set_xlabel("step"), ax.set_ylabel("prompt alignment R²"), ax.set_title("R² (held-out runs)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_alignment(result: dict, out_png: str) -> str:
    """One scatter per evaluated class of observed vs target loss, with the identity line, the
    per-prompt mean, and the median held-out loss as the reference level; R² and r in titles."""
    plt = _plt()

    def get(key, c):   # results loaded from JSON have str keys
        d = result[key]
        return d[c] if c in d else d[str(c)]

    classes = result["evaluated_classes"]
    pivots = set(result.get("pivots", []))
    cols = min(len(classes), 5)
    rows = -(-len(classes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.2 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= len(classes):
            ax.axis("off")
            continue
        c = classes[i]
        t = np.array([_num(v) for v in get("target", c)])
        o = np.array([_num(v) for v in get("observed", c)])
        ax.scatter(t, o, s=6, alpha=0.4, color="tab:red" if c in pivots else "tab:blue", lw=0)
        prompts = np.array(get("prompts", c), dtype=float)
        per = len(t) // max(1, len(prompts))
        if per >= 1 and per * len(prompts) == len(t):
            with np.errstate(all="ignore"):
                ax.plot(prompts, np.nanmean(o.reshape(len(prompts), per), 1), color="k", lw=1, label="mean")
        fin = np.concatenate([t[np.isfinite(t)], o[np.isfinite(o)]])
        lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
        ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="identity")
        if "reference" in result:
            ax.axhline(get("reference", c), color="tab:green", ls=":", lw=1, label="median held-out")
        r2, r = _num(get("r2", c)), _num(get("pearson", c))
        ax.set_title(f"class {c}{' (pivot)' if c in pivots else ''}: R² {r2:.2f}, r {r:.2f}", fontsize=9)
        ax.set_xlabel("target loss", fontsize=8)
        ax.set_ylabel("observed val loss", fontsize=8)
        if i == 0:
            ax.legend(fontsize=7)
    s = result.get("settings", {})
    fig.suptitle(f"{result.get('kind', '')} prompt alignment, {s.get('sampler', '')}-{s.get('steps', '')}, "
                 f"{s.get('per_prompt', '')} nets x {s.get('num_prompts', '')} prompts; free-class mean R² "
                 f"{_num(result.get('r2_free_mean')):.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
