"""hyforget_fast: machine unlearning with diffusion hypernetworks, with fused kernels.

The package is grouped by stage of the data flow:
  ops/         kernel ops: MLPSpec, TokenLayout, tokenize/permute, class_metrics, backends
  collection/  bundled digits, batched multi-run collection, shard store, pair sampler
  hypernet/    DiHyFo-1/2, DDPM/DDIM, training, prompt-alignment evaluation
  unlearn/     forget(), unlearning metrics, baselines, the report
Importing never needs a GPU; `hyforget_fast.backends()` tells which kernels loaded.
"""
from .ops import (ClassMetrics, MLPSpec, ParamNorm, TokenLayout, backends, class_metrics, class_outputs, csr_linear,
                  csr_linear_sub_grad_, detokenize, permute, sample_perms, tokenize, validate_perms)

__version__ = "0.1.0"

# Later stages are loaded lazily so `import hyforget_fast` stays light: name -> module.
_LAZY = {"CollectConfig": "collection.collect", "preset": "collection.collect", "CheckpointStore": "collection.store",
         "PairDataset": "collection.pairs", "load_digits": "collection.data",
         "load_splits": "collection.data", "splits_from_manifest": "collection.data",
         # hypernetwork
         "HypernetConfig": "hypernet.models", "DiHyFo": "hypernet.models", "GaussianDiffusion": "hypernet.diffusion",
         "TrainConfig": "hypernet.train", "train": "hypernet.train", "Hypernet": "hypernet.api",
         "load_hypernet": "hypernet.api", "evaluate_hypernet": "hypernet.evaluate",
         "save_evaluation": "hypernet.evaluate", "pretrained": "hypernet.pretrained",
         "load_pretrained": "hypernet.pretrained", "model_card": "hypernet.pretrained",
         # unlearning
         "forget": "unlearn.forget", "ForgetResult": "unlearn.forget", "evaluate_forgetting": "unlearn.report",
         "evaluate_model": "unlearn.report",
         "BaselineResult": "unlearn.baselines", "retrain": "unlearn.baselines", "finetune": "unlearn.baselines",
         "neggrad_plus": "unlearn.baselines", "random_labels": "unlearn.baselines", "ssd": "unlearn.baselines",
         "tuned": "unlearn.baselines", "RetrievalIndex": "unlearn.baselines",
         "as_module": "unlearn.mlp", "flat_params": "unlearn.mlp"}
_LAZY.update({n: "unlearn.metrics" for n in (
    "accuracies", "prediction_overlap", "split_overlaps", "activation_distance", "js_divergence", "unlearning_score",
    "entropy", "mia", "MIA_VARIANTS", "anamnesis_index", "edit_locality", "nearest_checkpoint", "neighbour_distance",
    "CheckpointIndex")})

__all__ = ["MLPSpec", "TokenLayout", "ParamNorm", "backends", "tokenize", "detokenize", "permute",
           "sample_perms", "validate_perms", "class_metrics", "class_outputs", "ClassMetrics", "csr_linear",
           "csr_linear_sub_grad_", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hyforget_fast' has no attribute {name!r}")
