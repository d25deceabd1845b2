"""Target formats are exact to themselves: a row's result never depends on the other rows of the forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from castspec.engine import SpeculativeGenerator
from castspec.models.formats import RowInt8Linear, quantize_int8_rows
from castspec.models.kernels import describe_kernels
from castspec.models.runner import CausalLMRunner
from tests.conftest import ToyTokenizer, tiny_model


def linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(96, 160, bias=bias)


@pytest.mark.parametrize("smoothed", [False, True])
def test_int8_rows_are_bitwise_independent_of_their_neighbours(smoothed):
    lin = linear()
    smooth = torch.rand(96) + 0.5 if smoothed else None
    q = RowInt8Linear(lin, smooth)
    torch.manual_seed(1)
    x = torch.randn(7, 96)
    x[3] *= 40.0  # a sibling with a much larger range, as a tree node might have
    alone = torch.cat([q(x[i: i + 1]) for i in range(7)])
    assert torch.equal(alone, q(x))
    assert torch.equal(q(x[2:5])[1], alone[3])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_plain_dynamic_int8_is_not_row_independent():
    """The control: fbgemm's own dynamic int8 (one scale per input matrix) does depend on neighbours."""
    lin = linear()
    q = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]
    torch.manual_seed(1)
    x = torch.randn(7, 96)
    x[3] *= 40.0
    assert not torch.equal(q(x[0:1]), q(x)[0:1])


@pytest.mark.parametrize("smoothed", [False, True])
def test_int8_rows_stay_close_to_fp32(smoothed):
    lin = linear(bias=False)
    torch.manual_seed(2)
    x = torch.randn(5, 96)
    smooth = torch.rand(96) + 0.5 if smoothed else None
    ref = lin(x)
    err = (RowInt8Linear(lin, smooth)(x) - ref).norm() / ref.norm()
    assert err < 0.05


def int8_model(seed: int):
    model = tiny_model("qwen2", seed=seed, sharpen=4.0).float()
    count = quantize_int8_rows(model)
    assert count == 2 * 7 + 1  # 7 linears per layer + lm_head
    return model


def test_int8_model_tree_logits_equal_each_path_alone():
    """A tree forward's logits at every node equal, bitwise, the same path decoded alone in the same format."""
    model = int8_model(seed=3)
    assert describe_kernels(model).startswith("int8-rows")
    prefix = [3, 9, 27, 81, 50, 60, 70, 11]
    runner = CausalLMRunner(model)
    runner.prefill([prefix])
    # root 7 -> a(10), b(11); a -> c(12)
    tokens = torch.tensor([[7, 10, 11, 12]])
    positions = torch.tensor([[8, 9, 9, 10]])
    mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]], dtype=torch.bool)
    runner.begin_block()
    tree = runner.forward(tokens, positions, mask)
    for slot, path in {0: [7], 1: [7, 10], 2: [7, 11], 3: [7, 10, 12]}.items():
        alone = CausalLMRunner(model)
        alone.prefill([prefix])
        for i, token in enumerate(path):
            alone.begin_block()
            logits = alone.forward(torch.tensor([[token]]), torch.tensor([[8 + i]]),
                                   torch.ones(1, 1, 1, dtype=torch.bool))
            alone.commit(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))
        torch.testing.assert_close(tree[0, slot], logits[0, -1], atol=1e-5, rtol=1e-5)
        assert torch.equal(tree[0, slot].argmax(), logits[0, -1].argmax())


@pytest.mark.parametrize("policy", ["chain:gamma=3", "eagle2:total_tokens=12,depth=3,top_k=3"])
def test_speculative_decoding_of_an_int8_target_equals_its_plain_decoding(policy):
    target = int8_model(seed=4)
    draft = tiny_model("qwen2", seed=4, layers=1, sharpen=4.0).float()
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="ar")
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22]]
    plain = [r.token_ids for r in gen.generate_batch(prompts, max_new_tokens=20)]
    spec = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy)
    assert [r.token_ids for r in spec.generate_batch(prompts, max_new_tokens=20)] == plain


def test_cli_generates_with_an_int8_target(tmp_path, capsys):
    """`--target-dtype int8` end to end on a tiny saved model: speculative output equals int8 plain decoding."""
    import json

    from castspec.cli import main
    from tests.test_cli import save_tiny

    target, draft = save_tiny(tmp_path / "t", seed=0), save_tiny(tmp_path / "d", seed=0, layers=1)
    code = main(["generate", "--target", target, "--draft", draft, "--target-dtype", "int8", "--policy", "chain",
                 "--prompt", "hello world", "--max-new-tokens", "10", "--json", "--compare"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ar"]["identical"] is True and result["new_tokens"] == 10
