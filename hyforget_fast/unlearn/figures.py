"""Figures of a forgetting report: candidate selection, confusion matrices, prompt vs observed loss."""
from __future__ import annotations

import os

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def forgetting_figures(report: dict, out_dir: str) -> list[str]:
    """Write selection_*.png, confusion_*.png and prompt_vs_observed_*.png for the first seed of
    every forget set. -> the paths written."""
    plt = _plt()
    paths = []
    classes = report["classes"]
    first = {}
    for run in report["runs"]:
        first.setdefault(tuple(run["forget"]), run)
    conf = {tuple(c["forget"]): c for c in report.get("confusion", [])}
    for fs, run in first.items():
        tag = "-".join(map(str, fs))
        gens = [g for g in ("dihyfo1", "dihyfo2") if g in run["extra"]]
        if gens:   # candidate-selection scatter: val forget acc vs val retain acc, the chosen one marked
            fig, axes = plt.subplots(1, len(gens), figsize=(5 * len(gens), 4), squeeze=False)
            for ax, g in zip(axes[0], gens):
                e = run["extra"][g]
                f, r = np.asarray(e["val_forget_acc"]), np.asarray(e["val_retain_acc"])
                ax.scatter(f, r, s=8, alpha=0.5, label=f"{len(f)} candidates")
                ax.scatter([f[e["chosen"]]], [r[e["chosen"]]], s=80, marker="*", c="red", label="chosen")
                ax.set(xlabel="validation accuracy on D_f", ylabel="validation accuracy on D_r",
                       title=f"{g}: D_f = {set(fs)}", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
                ax.legend(loc="lower right")
            p = os.path.join(out_dir, f"selection_{tag}.png")
            fig.tight_layout()
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
            # observed (validation) vs prompted loss of every candidate, per class
            m = len(classes)
            fig, axes = plt.subplots(len(gens), m, figsize=(3.2 * m, 3.2 * len(gens)), squeeze=False)
            for gi, g in enumerate(gens):
                e = run["extra"][g]
                tgt, obs = np.asarray(e["prompt"]), np.asarray(e["val_class_loss"])
                for c in range(m):
                    ax = axes[gi][c]
                    ax.scatter(tgt[:, c], obs[:, c], s=6, alpha=0.4)
                    lo = float(np.nanmin([tgt[:, c].min(), np.nanmin(obs[:, c])]))
                    hi = float(np.nanmax([tgt[:, c].max(), np.nanmax(obs[:, c])]))
                    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
                    ax.set(title=f"{g} class {classes[c]}", xlabel="target loss", ylabel="observed val loss")
            p = os.path.join(out_dir, f"prompt_vs_observed_{tag}.png")
            fig.tight_layout()
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
        c = conf.get(fs)
        if c is not None:   # confusion matrices (test) of each method beside the retrained model's
            y = np.asarray(c["y_test"])
            names = ["retrain"] + [n for n in c["preds"] if n not in ("retrain", "retrain_median")]
            m = len(classes)
            fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.9), squeeze=False)
            for ax, n in zip(axes[0], names):
                pred = np.asarray(c["preds"][n])
                cm = np.zeros((m, m))
                np.add.at(cm, (y, pred), 1)
                cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
                ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
                for i in range(m):
                    for j in range(m):
                        ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=6)
                ax.set(title=n, xticks=range(m), yticks=range(m), xticklabels=classes, yticklabels=classes,
                       xlabel="predicted", ylabel="true")
            p = os.path.join(out_dir, f"confusion_{tag}.png")
            fig.tight_layout()
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths
