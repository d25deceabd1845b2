"""The Python API refuses bad input with a `CastspecError` naming the problem, never a crash deep in torch."""

from __future__ import annotations

import pytest
import torch

from castspec.engine import SpeculativeGenerator
from castspec.errors import CastspecError
from castspec.policies import make_policy
from castspec.verify import SamplingConfig, TokenChooser
from tests.conftest import VOCAB, ToyTokenizer, tiny_model


@pytest.fixture(scope="module")
def models():
    return tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1, layers=1)


@pytest.mark.parametrize("spec, message", [
    ("cast:C1=abc", "C1 must be a number, got 'abc'"),
    ("cast:C2=inf", "C2 must be a number"),
    ("chain:gamma=2.5", "gamma must be a whole number, got '2.5'"),
    ("chain:gamma=", "gamma must be a whole number, got ''"),
    ("chain:gamma", "not of the form key=value"),
    ("chain:gamma=2,gamma=3", "'gamma' is given twice"),
    ("eagle2:width=4", "no parameter 'width' (its parameters are total_tokens, depth, top_k)"),
    ("static:rank=1", "its parameters are paths"),
    ("ar:gamma=1", "no parameter 'gamma' (it takes no parameters)"),
    ("beam", "unknown policy 'beam'"),
])
def test_bad_policy_spec(spec, message):
    with pytest.raises(CastspecError) as err:
        make_policy(spec)
    assert message in str(err.value)


def test_policy_values_take_the_type_of_their_default():
    policy = make_policy("cast:C1=4,top_k=3,mode=paper")
    assert (policy.C1, policy.top_k, policy.mode) == (4.0, 3, "paper")
    assert make_policy("static:paths=0;1;0.0").paths == "0;1;0.0"


@pytest.mark.parametrize("spec, message", [
    (f"eagle2:top_k={VOCAB + 1},depth=2", f"top_k={VOCAB + 1} is larger than the vocabulary ({VOCAB} tokens)"),
    (f"static:paths=0;{VOCAB}", f"child rank {VOCAB} of a node but the vocabulary has only {VOCAB} tokens"),
])
def test_tree_wider_than_the_vocabulary_is_refused_when_built(models, spec, message):
    target, draft = models
    with pytest.raises(CastspecError) as err:
        SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=spec)
    assert message in str(err.value)


def test_tree_as_wide_as_the_vocabulary_still_runs(models):
    target, draft = models
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=f"static:paths=0;{VOCAB - 1}")
    assert len(gen.generate([5, 6], max_new_tokens=3).token_ids) == 3


@pytest.mark.parametrize("prompt, message", [
    ([5, VOCAB], f"prompt token id {VOCAB} is outside the vocabulary (0 .. {VOCAB - 1})"),
    ([5, 99999], "prompt token id 99999 is outside the vocabulary"),
    ([-1, 5], "prompt token id -1 is outside the vocabulary"),
    ([5, 2.5], "prompt token ids must be whole numbers"),
    (torch.tensor([1.0, 2.0]), "prompt token ids must be whole numbers"),
    ([], "the prompt is empty"),
])
def test_bad_token_ids_are_refused(models, prompt, message):
    gen = SpeculativeGenerator(models[0], ToyTokenizer(), policy="ar")
    with pytest.raises(CastspecError) as err:
        gen.generate(prompt, max_new_tokens=2)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature must be a number >= 0"),
    ({"temperature": float("nan")}, "temperature must be a number >= 0"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"temperature": 1.0, "top_p": 1.01}, "top_p must be in (0, 1]"),
    ({"temperature": 1.0, "top_k": -1}, "top_k must be a whole number >= 0"),
    ({"temperature": 1.0, "top_k": 2.5}, "top_k must be a whole number >= 0"),
    ({"temperature": 1.0, "seed": 1.5}, "seed must be a whole number"),
])
def test_bad_sampling_settings_are_refused(models, kwargs, message):
    gen = SpeculativeGenerator(models[0], ToyTokenizer(), policy="ar")
    with pytest.raises(CastspecError) as err:
        gen.generate([5, 6], max_new_tokens=2, **kwargs)
    assert message in str(err.value)


def test_unseeded_sampling_leaves_torchs_global_generator_alone():
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    TokenChooser(SamplingConfig(temperature=1.0, seed=None))
    assert torch.equal(torch.rand(1), expected)


def test_unseeded_sampling_still_differs_between_choosers():
    logits = torch.zeros(1, 1000)  # uniform over 1000 tokens: 20 choosers all drawing the same token has p = 1e-57
    assert len({int(TokenChooser(SamplingConfig(temperature=1.0))(logits)) for _ in range(20)}) > 1
