"""Figures of a collection: per-class loss coverage histograms (are the bins balanced?)."""
from __future__ import annotations

import os

import numpy as np


def plot_coverage(root: str, out_png: str | None = None, bins: int = 40) -> str:
    """One histogram per class of the saved checkpoints' validation losses (initial params
    excluded), pivot classes marked, the collection's bin edges drawn. -> path of the PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .store import CheckpointStore
    st = CheckpointStore(root, verify="size")
    loss, phase = st.load("class_loss"), st.load("phase")
    loss = loss[phase != 0]
    cfg = st.manifest["config"]
    classes, pivots = st.classes, set(st.manifest.get("pivots", []))
    m = len(classes)
    cols = min(m, 5)
    rows = -(-m // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    finite = loss[np.isfinite(loss)]
    hi = float(np.quantile(finite, 0.995)) if finite.size else 1.0
    edges = np.linspace(0, max(hi, 1e-3), bins + 1)
    for c in range(rows * cols):
        ax = axes[c // cols][c % cols]
        if c >= m:
            ax.axis("off")
            continue
        ax.hist(np.clip(loss[:, c], 0, edges[-1]), bins=edges, color="tab:red" if classes[c] in pivots else "tab:blue")
        for e in cfg.get("bin_edges", []):
            if e <= edges[-1]:
                ax.axvline(e, color="k", lw=0.5, ls=":")
        ax.set_title(f"class {classes[c]}" + (" (pivot)" if classes[c] in pivots else ""), fontsize=9)
        ax.set_xlabel("val loss", fontsize=8)
    fig.suptitle(f"{len(loss)} checkpoints, {len(st.manifest['shards'])} shards", fontsize=10)
    fig.tight_layout()
    out_png = out_png or os.path.join(root, "coverage.png")
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
