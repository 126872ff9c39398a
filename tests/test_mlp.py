"""Flat parameters <-> nn.Module: a module with NaN / inf parameters is refused by name, the same
way flat parameters are, before any method reads it."""
import pytest
import torch

import hyforget_fast as hf
from hyforget_fast.ops import reference as ref
from hyforget_fast.unlearn import mlp
from hyforget_fast.unlearn.report import evaluate_model


def _module(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return hf.as_module(torch.randn(spec.num_params, generator=g) * 0.1, spec)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_flat_params_refuses_non_finite_parameters_naming_them(bad):
    spec = hf.MLPSpec([784, 3, 4])
    m = _module(spec)
    assert torch.equal(hf.as_module(hf.flat_params(m, spec), spec)[2].weight, m[2].weight)   # finite: round trip
    with torch.no_grad():
        m[2].weight[1, 2] = bad
    with pytest.raises(ValueError, match=r"model parameter 2\.weight \(4, 3\) holds 1 non-finite value\(s\) "
                                         r"\(NaN or inf\), the first at index \(1, 2\)"):
        hf.flat_params(m, spec)


def test_evaluate_model_names_the_nan_parameter_not_the_softmax():
    spec = hf.MLPSpec([784, 3, 4])
    m = _module(spec)
    with torch.no_grad():
        m[0].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"model parameter 0\.bias"):
        evaluate_model(m, hf.load_digits([0, 1, 2, 3], seed=0), forget=[2], reference=torch.zeros(spec.num_params))


def test_batched_logits_is_the_reference_forward():
    assert mlp.batched_logits is ref.mlp_logits
