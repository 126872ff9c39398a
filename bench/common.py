"""Shared benchmark helpers: timing with medians, machine description, markdown tables."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str = "cpu", repeats: int = 5, warmup: int = 1,
                budget_s: float = 20.0) -> float:
    """Median wall time of fn() in seconds; fewer repeats if one call is slower than budget/repeats."""
    for _ in range(warmup):
        fn()
        sync(device)
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def emit(md: str, path: str | None) -> None:
    """Print a result table and append it to `path` (a markdown file) when given."""
    print(md)
    if path:
        with open(path, "a") as f:
            f.write(md + "\n\n")
