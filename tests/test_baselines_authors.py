"""Each post-hoc baseline against its authors' published code, written out here independently in
plain torch (nn.Linear modules, DataLoaders, torch.optim, the authors' loops and loss terms):

- SSD: `ParameterPerturber.calc_importance` / `modify_weight` of the SSD code (Foster et al.,
  ssd.py), called as `ssd_tuning` does, on the loaders of forget_full_class_main.py: an unshuffled
  DataLoader(forget_train, 64) and DataLoader(ConcatDataset((retain_train, forget_train)), 64),
  the sets built class by class as `get_classwise_ds` / `build_retain_forget_sets` build them;
- NegGrad+ and fine-tuning: `negative_grad` / `run_neggrad_epoch` and `finetune` /
  `run_train_epoch` of the SCRUB code (Kurmanji et al., small_scale_unlearning.ipynb), with its
  zip(retain_loader, cycle(forget_loader)) pairing and `l2_penalty`;
- random labels: `amnesiac` / `fit_one_unlearning_cycle` of the SSD code (Adam on the relabelled
  D_f followed by D_r, shuffled).

The shuffled loaders draw each epoch's order as torch.randperm from one shared generator (the
package's documented draws), so both sides see the same batches and must agree to float tolerance.
"""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Sampler, TensorDataset

from hyforget_fast.unlearn import baselines as bl

torch.set_num_threads(1)

# the same data and short-trained original model as the package's own baseline tests
from test_baselines import CFG, SPEC, model, splits  # noqa: E402,F401  (pytest fixtures)


# ------------------------------------------------------------------ plain-torch helpers
def to_module(flat: torch.Tensor, sizes) -> nn.Sequential:
    """Flat (W row-major, b) per layer -> nn.Sequential(Linear, ReLU, ..., Linear)."""
    layers, o = [], 0
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(flat[o:o + a * b].view(b, a))
            o += a * b
            lin.bias.copy_(flat[o:o + b])
            o += b
        layers += [lin] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    assert o == len(flat)
    return nn.Sequential(*layers)


def to_flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class PermSampler(Sampler):
    """A shuffling sampler: every pass is one torch.randperm(n) from the shared generator, drawn
    when the pass begins (as a DataLoader(shuffle=True) draws a new order per epoch)."""

    def __init__(self, n, gen):
        self.n, self.gen = n, gen

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.gen).tolist())

    def __len__(self):
        return self.n


def class_sets(splits, forget):
    """The SSD code's retain_train / forget_train: a list of (x, y) per class, in split order
    (get_classwise_ds), concatenated class by class in ascending order (build_retain_forget_sets)."""
    classwise = {c: [] for c in range(len(splits.classes))}
    for x, y in zip(splits.X_train, splits.y_train.tolist()):
        classwise[y].append((x, y))
    fidx = [splits.classes.index(c) for c in forget]
    retain = [s for c in sorted(classwise) if c not in fidx for s in classwise[c]]
    forget_set = [s for c in sorted(classwise) if c in fidx for s in classwise[c]]
    return retain, forget_set


def retain_forget_tensors(splits, forget):
    """SCRUB's retain / forget datasets: the samples of each kind in their split order."""
    fidx = [splits.classes.index(c) for c in forget]
    fm = torch.isin(splits.y_train, torch.tensor(fidx))
    return TensorDataset(splits.X_train[~fm], splits.y_train[~fm]), TensorDataset(splits.X_train[fm], splits.y_train[fm])


# ------------------------------------------------------------------ SSD (authors' ssd.py)
def authors_ssd(flat, splits, forget, alpha, lam, batch_size=64):
    model = to_module(flat, SPEC.layer_sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)          # only for zero_grad, as in ssd_tuning
    model.eval()
    retain, forget_set = class_sets(splits, forget)
    forget_dl = DataLoader(forget_set, batch_size)
    full_dl = DataLoader(ConcatDataset((retain, forget_set)), batch_size=batch_size)

    def calc_importance(dl):
        crit = nn.CrossEntropyLoss()
        imps = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
        for x, y in dl:
            opt.zero_grad()
            crit(model(x), y).backward()
            for (_, p), imp in zip(model.named_parameters(), imps.values()):
                if p.grad is not None:
                    imp.data += p.grad.data.clone().pow(2)
        for imp in imps.values():
            imp.data /= float(len(dl))
        return imps

    fimps = calc_importance(forget_dl)
    oimps = calc_importance(full_dl)
    with torch.no_grad():
        for (_, p), oimp, fimp in zip(model.named_parameters(), oimps.values(), fimps.values()):
            locations = torch.where(fimp > oimp.mul(alpha))
            update = (oimp.mul(lam).div(fimp)).pow(1)[locations]
            update[torch.where(update > 1)] = 1
            p[locations] = p[locations].mul(update)
    return to_flat(model), (to_flat_dict(fimps), to_flat_dict(oimps))


def to_flat_dict(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


@pytest.mark.parametrize("forget", [(2,), (2, 3), (0,)])
def test_ssd_matches_the_authors_code(model, splits, forget):
    fidx = bl.forget_indices(splits, forget)
    ri, fi = bl.authors_order(splits.y_train, fidx)
    ours_f = bl.importance(model, SPEC, splits.X_train[fi], splits.y_train[fi], 64)
    full = torch.cat([ri, fi])
    ours_d = bl.importance(model, SPEC, splits.X_train[full], splits.y_train[full], 64)
    _, (theirs_f, theirs_d) = authors_ssd(model, splits, forget, 1.0, 1.0)
    torch.testing.assert_close(ours_f, theirs_f, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(ours_d, theirs_d, rtol=1e-4, atol=1e-10)
    selected = {}
    for alpha, lam in ((10.0, 1.0), (3.0, 1.0), (2.0, 0.3), (1.5, 0.0), (1.0, 0.1)):
        want, _ = authors_ssd(model, splits, forget, alpha, lam)
        got = bl.ssd(model, SPEC, list(forget), splits, alpha=alpha, lam=lam)
        torch.testing.assert_close(got.params, want, rtol=1e-5, atol=1e-6)
        selected[alpha] = got.extra["selected"]
        if lam == 0:                                          # lam 0 zeroes every selected parameter
            assert int((got.params == 0).sum()) >= selected[alpha] > 0
    counts = [selected[a] for a in (10.0, 3.0, 2.0, 1.5, 1.0)]
    assert counts == sorted(counts), "a lower alpha selects at least the same parameters"


def test_ssd_batches_are_the_authors_not_shuffled(model, splits):
    """The importance over D is NOT the one over the same samples shuffled: mixing classes in a
    batch cancels gradients (the authors' loader keeps batches single-class)."""
    fidx = bl.forget_indices(splits, (2,))
    ri, fi = bl.authors_order(splits.y_train, fidx)
    full = torch.cat([ri, fi])
    ordered = bl.importance(model, SPEC, splits.X_train[full], splits.y_train[full], 64)
    perm = full[torch.randperm(len(full), generator=torch.Generator().manual_seed(0))]
    shuffled = bl.importance(model, SPEC, splits.X_train[perm], splits.y_train[perm], 64)
    assert shuffled.sum() < 0.8 * ordered.sum()
    # the ordered sets are class by class, each class in split order
    ys = splits.y_train[full]
    assert torch.all(ys[:len(ri)].diff() >= 0) and torch.all(ys[len(ri):] == fidx[0])
    for c in range(4):
        idx = full[ys == c]
        assert torch.all(idx.diff() > 0)


def test_ssd_ignores_seed_and_alpha_10_dampens_almost_nothing_at_4_classes(model, splits):
    a = bl.ssd(model, SPEC, [2], splits, alpha=3.0, seed=0)
    b = bl.ssd(model, SPEC, [2], splits, alpha=3.0, seed=5)
    assert torch.equal(a.params, b.params)
    # on single-class batches imp_f / imp_D mostly keeps to the per-sample bound n / n_f (= 4
    # here: 4 classes of equal size); only a rare parameter whose batch gradients cancel exceeds it
    fidx = bl.forget_indices(splits, (2,))
    ri, fi = bl.authors_order(splits.y_train, fidx)
    full = torch.cat([ri, fi])
    imp_f = bl.importance(model, SPEC, splits.X_train[fi], splits.y_train[fi], 64)
    imp_d = bl.importance(model, SPEC, splits.X_train[full], splits.y_train[full], 64)
    ratio = (imp_f / imp_d)[imp_d > 0]
    assert float(torch.quantile(ratio, 0.99)) < 5.0
    assert bl.ssd(model, SPEC, [2], splits, alpha=10.0).extra["selected"] < 0.005 * SPEC.num_params
    assert bl.ssd(model, SPEC, [2], splits, alpha=3.0).extra["selected"] > 0.05 * SPEC.num_params


# ------------------------------------------------------------------ SCRUB: NegGrad+ and fine-tuning
def l2_penalty(model, model_init, weight_decay):
    l2_loss = 0
    for (_, p), (_, p_init) in zip(model.named_parameters(), model_init.named_parameters()):
        if p.requires_grad:
            l2_loss += (p - p_init).pow(2).sum()
    return l2_loss * (weight_decay / 2.0)


def scrub_neggrad(flat, splits, forget, *, alpha, lr, epochs, retain_bs, forget_bs, weight_decay, seed):
    model = to_module(flat, SPEC.layer_sizes)
    model_init = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    rds, fds = retain_forget_tensors(splits, forget)
    retain_loader = DataLoader(rds, batch_size=retain_bs, sampler=PermSampler(len(rds), gen))
    forget_loader = DataLoader(fds, batch_size=forget_bs, sampler=PermSampler(len(fds), gen))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        model.eval()
        for (input_r, target_r), (input_f, target_f) in zip(retain_loader, itertools.cycle(forget_loader)):
            output_r, output_f = model(input_r), model(input_f)
            loss = alpha * (loss_fn(output_r, target_r) + l2_penalty(model, model_init, weight_decay)) \
                - (1 - alpha) * loss_fn(output_f, target_f)
            model.zero_grad()
            loss.backward()
            optimizer.step()
    return to_flat(model)


def scrub_finetune(flat, splits, forget, *, lr, epochs, batch_size, weight_decay, seed):
    model = to_module(flat, SPEC.layer_sizes)
    model_init = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    rds, _ = retain_forget_tensors(splits, forget)
    loader = DataLoader(rds, batch_size=batch_size, sampler=PermSampler(len(rds), gen))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        model.eval()
        for input, target in loader:
            loss = loss_fn(model(input), target) + l2_penalty(model, model_init, weight_decay)
            model.zero_grad()
            loss.backward()
            optimizer.step()
    return to_flat(model)


@pytest.mark.parametrize("forget,l2,seed", [((2,), 0.0, 0), ((2,), 0.1, 3), ((2, 3), 0.0, 1)])
def test_neggrad_plus_matches_scrub(model, splits, forget, l2, seed):
    kw = dict(lr=0.05, epochs=3)
    want = scrub_neggrad(model, splits, forget, alpha=0.9, retain_bs=32, forget_bs=64, weight_decay=l2,
                         seed=seed, **kw)
    got = bl.neggrad_plus(model, SPEC, list(forget), splits, beta=0.9, batch_size=32, forget_batch_size=64,
                          l2=l2, seed=seed, **kw)
    assert not torch.allclose(want, model, atol=1e-3), "the reference must move the model"
    torch.testing.assert_close(got.params, want, rtol=1e-4, atol=1e-5)
    # the forget batches repeat within an epoch (cycle replays its first pass): a stream that
    # continued across the retain loop would differ
    assert got.hparams["forget_batch_size"] == 64 and got.hparams["l2"] == l2


@pytest.mark.parametrize("l2,seed", [(0.0, 0), (0.1, 2)])
def test_finetune_matches_scrub(model, splits, l2, seed):
    want = scrub_finetune(model, splits, (2,), lr=0.1, epochs=3, batch_size=32, weight_decay=l2, seed=seed)
    got = bl.finetune(model, SPEC, [2], splits, lr=0.1, epochs=3, batch_size=32, l2=l2, seed=seed)
    assert not torch.allclose(want, model, atol=1e-3)
    torch.testing.assert_close(got.params, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ SSD code's amnesiac (random labels)
def authors_amnesiac(flat, splits, forget, *, lr, epochs, batch_size, seed):
    model = to_module(flat, SPEC.layer_sizes)
    gen = torch.Generator().manual_seed(seed)
    retain, forget_set = class_sets(splits, forget)
    fidx = [splits.classes.index(c) for c in forget]
    unlearninglabels = [c for c in range(len(splits.classes)) if c not in fidx]
    picks = torch.randint(len(unlearninglabels), (len(forget_set),), generator=gen).tolist()  # random.choice
    trainset = [(x, unlearninglabels[k]) for (x, _), k in zip(forget_set, picks)] + list(retain)
    loader = DataLoader(trainset, batch_size, sampler=PermSampler(len(trainset), gen))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return to_flat(model), picks


@pytest.mark.parametrize("forget,seed", [((2,), 0), ((1, 3), 4)])
def test_random_labels_match_the_authors_amnesiac(model, splits, forget, seed):
    want, picks = authors_amnesiac(model, splits, forget, lr=0.01, epochs=2, batch_size=128, seed=seed)
    got = bl.random_labels(model, SPEC, list(forget), splits, lr=0.01, epochs=2, batch_size=128, seed=seed)
    assert not torch.allclose(want, model, atol=1e-3)
    torch.testing.assert_close(got.params, want, rtol=1e-4, atol=1e-5)
    assert len(set(picks)) > 1                           # the labels are spread over the retain classes
    assert got.hparams["optimizer"] == "adam"


# ------------------------------------------------------------------ the report names bounds and flags ranges
def test_report_flags_negative_bad_teacher_phi_and_names_grid_bounds():
    from hyforget_fast.unlearn import report as R
    grid = {"lr": [0.01, 0.1], "epochs": [3, 10]}
    runs = []
    for seed, phi_bt in ((0, -1.8), (1, 0.93)):
        rows = {"retrain": {"acc_retain": 0.99, "acc_forget": 0.0, "phi": 1.0, "phi_bt": 1.0},
                "finetune": {"acc_retain": 0.98, "acc_forget": 0.0, "phi": 0.8, "phi_bt": phi_bt}}
        runs.append({"forget": [2], "seed": seed, "methods": rows,
                     "extra": {"finetune": {"tuning": {"grid": grid, "chosen": {"lr": 0.1, "epochs": 3},
                                                       "at_bound": bl.grid_bounds(grid, {"lr": 0.1, "epochs": 3})}}}})
    report = {"runs": runs, "classes": [0, 1, 2, 3], "tuning_grids": {"finetune": grid}}
    report["summary"] = R.summarize(report)
    md = R.markdown_tables(report)
    line = next(l for l in md.splitlines() if l.startswith("| Fine-tune") and "0.800" in l)
    assert R.RANGE_MARK in line                                   # φ bad-teacher of seed 0 is -1.8
    retrain_line = next(l for l in md.splitlines() if l.startswith("| Retrain") and "1.000" in l)
    assert R.RANGE_MARK not in retrain_line
    assert "1 of 2 seeds outside [0.000, 1.000] (lowest -1.800)" in md and "KL(M||P)" in md
    assert "lr=0.1 (highest), epochs=3 (lowest)" in md
    assert bl.GRID_BOUNDS["finetune"]["lr"] in md and bl.GRID_BOUNDS["finetune"]["epochs"] in md
