"""Fast CPU kernels: oneDNN pre-packed fp32 linears and int8 dynamic quantization, on tiny random models."""

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn

from castspec.models import kernels
from castspec.models.kernels import (
    OneDNNLinear,
    describe_kernels,
    quantize_draft_int8,
    use_fast_cpu_linears,
)

needs_onednn = pytest.mark.skipif(kernels._onednn_unavailable_reason() is not None,
                                  reason="oneDNN packed linear unavailable in this torch build")


def tiny_model(arch: str = "qwen2", *, tied: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0):
    common = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": tied}
    config = transformers.Qwen2Config(**common) if arch == "qwen2" else transformers.LlamaConfig(**common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Larger than the default init (std 0.02), so that logits are far from zero and argmax is not a coin flip.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    return model.eval()


def n_linears(model: nn.Module) -> int:
    return sum(type(m) is nn.Linear for m in model.modules())


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@needs_onednn
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_linears_match_stock(arch, ids):
    model = tiny_model(arch)
    expected = logits(model, ids)
    linears = n_linears(model)
    assert describe_kernels(model) == "stock"

    assert use_fast_cpu_linears(model) == linears  # lm_head included
    assert n_linears(model) == 0
    assert isinstance(model.lm_head, OneDNNLinear)
    assert describe_kernels(model) == "onednn-fp32"
    got = logits(model, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert use_fast_cpu_linears(model) == 0  # idempotent


@needs_onednn
def test_packed_linears_in_generate_and_cache(ids):
    model = tiny_model()
    expected = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    use_fast_cpu_linears(model)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=8, do_sample=False), expected)


@needs_onednn
@pytest.mark.parametrize("min_rows", [kernels.DEFAULT_MIN_ROWS, 0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5,), (1, 5), (3, 5), (2, 3, 5), (2, 2, 3, 5), (0, 5)])
def test_onednn_linear_any_leading_shape(bias, shape, min_rows):
    torch.manual_seed(0)
    linear = nn.Linear(5 * 8, 24, bias=bias)
    x = torch.randn(*shape[:-1], shape[-1] * 8)
    module = OneDNNLinear(linear, min_rows=min_rows)
    assert module(x).shape == (*shape[:-1], 24)
    torch.testing.assert_close(module(x), linear(x), atol=1e-5, rtol=1e-5)
    # A non-contiguous input and a float64 input (which falls back to F.linear) give the same result too.
    xt = torch.randn(40, 7).t()
    torch.testing.assert_close(module(xt), linear(xt), atol=1e-5, rtol=1e-5)
    x64 = x.double()
    assert module(x64).dtype == torch.float64
    torch.testing.assert_close(module(x64), linear(x).double(), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_weight_reads_back_and_memory_is_not_doubled():
    linear = nn.Linear(16, 8)
    original = linear.weight.detach().clone()
    module = OneDNNLinear(linear)
    assert "weight" not in dict(module.named_parameters())  # only the packed copy is held
    assert torch.equal(module.weight, original)
    assert module.weight.shape == (8, 16)
    assert module.weight.dtype == torch.float32
    assert module.bias is linear.bias
    kept = OneDNNLinear(linear, keep_weight=True)
    assert kept.weight is linear.weight


@needs_onednn
def test_packed_model_can_be_deep_copied(ids):
    model = tiny_model()
    expected = logits(model, ids)
    use_fast_cpu_linears(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone, ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_non_float32_model_is_untouched(dtype, ids):
    model = tiny_model(dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = n_linears(model)
    assert use_fast_cpu_linears(model) == 0
    assert quantize_draft_int8(model) == 0
    assert n_linears(model) == linears
    assert describe_kernels(model) == "stock"
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    logits(model, ids)  # still runs


def test_meta_model_is_untouched():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert use_fast_cpu_linears(model) == 0
    assert quantize_draft_int8(model) == 0


def test_unavailable_onednn_warns_once_and_does_nothing(monkeypatch):
    monkeypatch.setattr(kernels, "_onednn_unavailable_reason", lambda: "torch was built without oneDNN (mkldnn)")
    monkeypatch.setattr(kernels, "_warned", set())
    model = tiny_model()
    with pytest.warns(RuntimeWarning, match="without oneDNN"):
        assert use_fast_cpu_linears(model) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert use_fast_cpu_linears(model) == 0
    assert describe_kernels(model) == "stock"


def test_unavailable_int8_warns_once_and_does_nothing(monkeypatch):
    monkeypatch.setattr(kernels, "_int8_backend", lambda: "torch.ao.quantization is unavailable")
    monkeypatch.setattr(kernels, "_warned", set())
    model = tiny_model()
    with pytest.warns(RuntimeWarning, match="int8"):
        assert quantize_draft_int8(model) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantize_draft_int8(model) == 0
    assert describe_kernels(model) == "stock"


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_int8_draft_runs_and_stays_close(arch, ids):
    model = tiny_model(arch)
    expected = logits(model, ids)
    linears = n_linears(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's deprecation notices are silenced
        assert quantize_draft_int8(model) == linears
        got = logits(model, ids)
    assert n_linears(model) == 0
    assert describe_kernels(model) == "int8-dynamic"
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert correlation(got, expected) > 0.9
    assert quantize_draft_int8(model) == 0  # idempotent
    model.generate(ids[:1], max_new_tokens=4, do_sample=False)


@needs_onednn
def test_int8_after_packing_and_packing_after_int8(ids):
    model = tiny_model()
    expected = logits(model, ids)
    linears = n_linears(model)
    assert use_fast_cpu_linears(model) == linears
    assert quantize_draft_int8(model) == linears  # OneDNNLinear layers are quantized too
    assert use_fast_cpu_linears(model) == 0  # nothing left to pack
    assert describe_kernels(model) == "int8-dynamic"
    assert correlation(logits(model, ids), expected) > 0.9


def test_describe_mixed_kernels():
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8)), nn.Linear(8, 8))
    assert quantize_draft_int8(model[0]) == 1
    assert describe_kernels(model) == "int8-dynamic+stock"
    assert describe_kernels(nn.Sequential(nn.ReLU())) == "stock"


@needs_onednn
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tied_embeddings_survive_both_transforms(arch, ids):
    model = tiny_model(arch, tied=True)
    embedding = model.get_input_embeddings()
    assert model.lm_head.weight is embedding.weight
    expected = logits(model, ids)
    expected_tokens = model.generate(ids[:1], max_new_tokens=6, do_sample=False)

    fast = copy.deepcopy(model)
    assert use_fast_cpu_linears(fast) == n_linears(model)
    fast_embedding = fast.get_input_embeddings()
    assert fast.lm_head.weight is fast_embedding.weight  # still tied, and still a plain fp32 Parameter
    assert isinstance(fast_embedding.weight, nn.Parameter)
    assert fast_embedding.weight.dtype == torch.float32
    assert not fast_embedding.weight.is_mkldnn
    torch.testing.assert_close(logits(fast, ids), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(fast.generate(ids[:1], max_new_tokens=6, do_sample=False), expected_tokens)

    for draft in (copy.deepcopy(model), fast):  # int8 from stock, and int8 on top of packing
        assert quantize_draft_int8(draft) == n_linears(model)
        draft_embedding = draft.get_input_embeddings()
        assert isinstance(draft_embedding.weight, nn.Parameter)
        assert draft_embedding.weight.dtype == torch.float32
        torch.testing.assert_close(draft_embedding.weight, embedding.weight)
        assert correlation(logits(draft, ids), expected) > 0.9
        draft.generate(ids[:1], max_new_tokens=6, do_sample=False)


def test_tree_attention_equals_stock_sdpa_without_copying_the_cache():
    """Folding grouped query heads into the query axis gives stock SDPA's result for a tree mask, and so does the
    canonical (chunked, position-ordered) computation targets use."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from castspec.models.attention import ATTENTION_NAME, key_layout, tree_attention
    from castspec.models.runner import CausalLMRunner
    from tests.conftest import tiny_model

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    slots, n = 75, 5
    query = torch.randn(2, 6, n, 8, dtype=torch.float64)
    key, value = torch.randn(2, 2, slots, 8, dtype=torch.float64), torch.randn(2, 2, slots, 8, dtype=torch.float64)
    allowed = torch.rand(2, n, slots) > 0.4
    allowed[:, :, -n:] = torch.eye(n, dtype=torch.bool)  # each query sees itself among the new slots
    allowed[:, :, :40] = True  # and a committed prefix
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -1e300)[:, None]
    key_pos = torch.arange(slots).expand(2, -1).clone()
    key_pos[:, -n:] = 70  # every query at the same position
    layout = key_layout(allowed, key_pos, torch.full((2, n), 70))
    stock, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    for extra in ({}, {"castspec_layout": layout}):
        ours, _ = tree_attention(module, query, key, value, mask, scaling=0.3, **extra)
        torch.testing.assert_close(ours, stock, atol=1e-12, rtol=1e-12)
    model = tiny_model("qwen2", seed=1)
    CausalLMRunner(model)
    assert model.config._attn_implementation == ATTENTION_NAME
