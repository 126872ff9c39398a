"""The README's Python forgetting example runs as written (after `import hyforget_fast as hf`, in
the folder where the README's first command ran), against a small collection of the shipped
model's data split made here at the path that command writes."""
import math
import os
import re

import pytest
import torch

from hyforget_fast.collection.collect import collect, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda *_: None  # noqa: E731


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def forgetting_example() -> str:
    """The first python block of the README's "## Forgetting" section."""
    text = _readme()
    section = text[text.index("\n## Forgetting"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Forgetting section has no python block"
    return blocks[0]


def test_readme_first_command_writes_the_folder_the_example_reads():
    first = re.search(r"```bash\n(.*?)```", _readme(), flags=re.S).group(1)
    assert "hyforget demo --out runs/demo" in first
    # the demo's collection of a setting lies in OUT/<setting>-data (demo.run_demo)
    import inspect

    from hyforget_fast import demo
    assert 'os.path.join(out, f"{setting}-data")' in inspect.getsource(demo.run_demo)
    assert 'data = "runs/demo/mnist4-data"' in forgetting_example()


def test_readme_forgetting_example_runs(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    code = forgetting_example()
    assert code.startswith("import hyforget_fast as hf\n")
    # the only change: a smaller K and fewer DDIM steps, so the test stays fast
    assert code.count("k=256") == 3 and code.count("steps=50") == 1
    code = code.replace("k=256", "k=12").replace("steps=50", "steps=3")
    collect(preset("mnist4", runs=4, block_runs=4, epochs=1, ckpts_per_run=4),
            str(tmp_path / "runs" / "demo" / "mnist4-data"), log=QUIET)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md (Forgetting)", "exec"), ns)
    res, m, splits = ns["res"], ns["m"], ns["splits"]
    assert res.forget_classes == (2,) and res.params.shape == (ns["hn"].spec.num_params,)
    assert res.prompt.shape[0] == 12 and ns["keep"].prompt.shape[0] == 12
    assert repr(res).startswith("ForgetResult(") and "\n" not in repr(res) and len(repr(res)) < 500
    assert tuple(splits.classes) == tuple(ns["hn"].classes)
    # evaluated on the TEST split: the accuracy on D_f is a fraction of the test digits of class 2
    n_f = int((splits.y_test == list(splits.classes).index(2)).sum())
    assert n_f > 0 and round(m["acc_forget"] * n_f, 6) == pytest.approx(round(m["acc_forget"] * n_f), abs=1e-4)
    assert all(0.0 <= m[k] <= 1.0 for k in ("acc_forget", "acc_retain")) and math.isfinite(m["mia"])
