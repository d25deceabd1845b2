"""One runtime per model (`castspec.runtime`): the profiler, the engine and every generator drive its one runner."""

from __future__ import annotations

import pytest

from castspec.cost.profiler import Grid, expected_meta, model_fingerprint, profile
from castspec.engine import SpeculativeGenerator
from castspec.runtime import ModelRuntime, runtime_of
from tests.conftest import ToyTokenizer, tiny_model


def pair() -> dict[str, ModelRuntime]:
    return {"target": ModelRuntime.of(tiny_model("qwen2", seed=1), "target", "fp64"),
            "draft": ModelRuntime.of(tiny_model("qwen2", seed=2, layers=1, sharpen=4.0), "draft", "fp64")}


def test_generators_and_the_profiler_drive_the_runtimes_own_runners():
    runtimes = pair()
    gen = SpeculativeGenerator(runtimes["target"], ToyTokenizer(), draft=runtimes["draft"], policy="chain:gamma=3")
    assert gen.target is runtimes["target"].runner
    assert gen.drafter.runner is runtimes["draft"].runner
    assert gen.runtimes == runtimes and gen.models == {r: rt.model for r, rt in runtimes.items()}
    assert runtimes["target"].runner.canonical and runtimes["draft"].role == "draft"

    profile(runtimes, Grid(batch_sizes=[3], contexts=[16], tokens=[1, 2], repeats=1), progress=False)
    for runtime in runtimes.values():  # the profile's synthetic contexts sit in these very runners' caches
        assert runtime.runner.batch_size == 3
    assert expected_meta(runtimes)["models"]["target"] == model_fingerprint(runtimes["target"].model)


def test_generators_sharing_runtimes_take_turns_and_stay_exact():
    """The bench builds one generator per method over the same runtimes: each request resets the shared caches,
    so interleaved requests of different methods each equal plain decoding."""
    runtimes = pair()
    plain = SpeculativeGenerator(runtimes["target"], ToyTokenizer(), draft=runtimes["draft"], policy="ar")
    spec = SpeculativeGenerator(runtimes["target"], ToyTokenizer(), draft=runtimes["draft"],
                                policy="eagle2:total_tokens=8,depth=3,top_k=2")
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22, 23]]
    for prompt in prompts:
        want = plain.generate(prompt, max_new_tokens=12).token_ids
        assert spec.generate(prompt, max_new_tokens=12).token_ids == want
        assert plain.generate(prompt, max_new_tokens=12).token_ids == want


def test_a_bare_model_gets_a_runtime_and_a_runtime_keeps_its_role():
    model = tiny_model("qwen2", seed=3)
    made = runtime_of(model, "draft")
    assert made.model is model and made.role == "draft" and not made.runner.canonical
    assert runtime_of(made, "draft") is made
    with pytest.raises(ValueError, match="a draft runtime was given as the target"):
        runtime_of(made, "target")
    with pytest.raises(ValueError, match="role must be one of"):
        ModelRuntime.of(model, "verifier")
