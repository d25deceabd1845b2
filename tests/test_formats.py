"""Target formats are exact to themselves: a row's result never depends on the other rows of the forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from castspec.engine import SpeculativeGenerator
from castspec.models.formats import RowInt8Linear, quantize_int8_rows
from castspec.models.kernels import describe_kernels
from castspec.models.runner import CausalLMRunner
from tests.conftest import VOCAB, ToyTokenizer, tiny_model


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


def int8_model(seed: int, hidden: int = 32):
    model = tiny_model("qwen2", seed=seed, hidden=hidden, sharpen=4.0).float()
    count = quantize_int8_rows(model)
    assert count == 2 * 7 + 1  # 7 linears per layer + lm_head
    return model


def decode_alone(model, prefix: list[int], path: list[int]) -> torch.Tensor:
    """Logits [len(path), V] of `path` decoded one token per forward after `prefix`, in a fresh runner."""
    runner = CausalLMRunner(model)
    runner.prefill([prefix])
    rows = []
    for i, token in enumerate(path):
        runner.begin_block()
        rows.append(runner.forward(torch.tensor([[token]]), torch.tensor([[len(prefix) + i]]),
                                   torch.ones(1, 1, 1, dtype=torch.bool))[0, -1])
        runner.commit(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    return torch.stack(rows)


def q4k_model(seed: int, hidden: int = 256, native: bool = True):
    """The q4k format as `load_generator` makes it, on a tiny model (quantized here: it has no GGUF; its linears
    need inputs in blocks of 256): GGUF linears, each decoder layer one native call (`native=False`: lean layers,
    torch ops around the GGUF linears)."""
    from castspec.models.attention import use_tree_attention
    from castspec.models.gguf_format import use_gguf_linears
    from castspec.models.lean import use_lean_layers
    from castspec.models.native_layer import use_native_layers

    model = tiny_model("qwen2", seed=seed, hidden=max(hidden, 256), sharpen=4.0).float()
    use_tree_attention(model)
    assert use_gguf_linears(model) == 2 * 7 + 1
    assert (use_native_layers if native else use_lean_layers)(model) == 2
    return model


def q4k_lean_model(seed: int, hidden: int = 256):
    return q4k_model(seed, hidden, native=False)


def fast_fp32_model(seed: int, hidden: int):
    from castspec.models.kernels import use_fast_cpu_linears

    model = tiny_model("qwen2", seed=seed, hidden=hidden, sharpen=4.0).float()
    use_fast_cpu_linears(model)
    return model


@pytest.mark.parametrize("make_model", [int8_model, q4k_model, q4k_lean_model, fast_fp32_model],
                         ids=["int8", "q4k", "q4k-lean", "fp32-onednn"])
def test_tree_logits_equal_each_path_alone(make_model):
    """A tree forward's logits at every node equal, bitwise, the same path decoded alone in the same format.

    Wide enough heads and a long enough prefix that attention computed differently for one query than for several,
    or over keys at other slots (torch's SDPA), shows up; canonical `tree_attention` must make them equal. Holds for
    int8 and for fp32 on oneDNN-packed linears (row-independent on this machine kind).
    """
    model = make_model(seed=3, hidden=256)
    prefix = [int(t) for t in torch.randint(3, VOCAB, (150,), generator=torch.Generator().manual_seed(0))]
    # a depth-4 tree: root 7 -> a(10), b(11); a -> c(12), d(13); c -> e(14); b -> f(15)
    tokens = torch.tensor([[7, 10, 11, 12, 13, 14, 15]])
    parents = [-1, 0, 0, 1, 1, 3, 2]
    depth = [0, 1, 1, 2, 2, 3, 2]
    mask = torch.zeros(1, 7, 7, dtype=torch.bool)
    for node, parent in enumerate(parents):
        mask[0, node] = mask[0, parent] if parent >= 0 else mask[0, node]
        mask[0, node, node] = True
    runner = CausalLMRunner(model)
    assert "+tree-attn" in describe_kernels(model)
    runner.prefill([prefix])
    runner.begin_block()
    tree = runner.forward(tokens, torch.tensor([[len(prefix) + d for d in depth]]), mask)[0]
    for leaf in (5, 4, 6):
        path = [leaf]
        while parents[path[0]] >= 0:
            path.insert(0, parents[path[0]])
        alone = decode_alone(model, prefix, [int(tokens[0, node]) for node in path])
        assert torch.equal(tree[path], alone), f"path {path}: max |diff| {(tree[path] - alone).abs().max():.3g}"


@pytest.mark.parametrize("make_model", [int8_model, q4k_model, q4k_lean_model, fast_fp32_model],
                         ids=["int8", "q4k", "q4k-lean", "fp32-onednn"])
def test_rows_of_a_batch_equal_each_row_alone(make_model):
    """Other sequences of a batch (other lengths, other tokens) never change a row's logits, bitwise."""
    model = make_model(seed=5, hidden=256)
    generator = torch.Generator().manual_seed(1)
    prompts = [[int(t) for t in torch.randint(3, VOCAB, (length,), generator=generator)] for length in (41, 17, 64)]
    runner = CausalLMRunner(model)
    first = runner.prefill(prompts, budget=8)
    tokens = torch.tensor([[5, 6], [7, 8], [9, 10]])
    runner.begin_block()
    chain = runner.forward(tokens, runner.next_pos[:, None] + torch.arange(2),
                           torch.ones(2, 2, dtype=torch.bool).tril().expand(3, -1, -1))
    for row, prompt in enumerate(prompts):
        alone = CausalLMRunner(model)
        assert torch.equal(alone.prefill([prompt], budget=8)[0], first[row])
        assert torch.equal(decode_alone(model, prompt, tokens[row].tolist()), chain[row])


@pytest.mark.parametrize("make_model", [int8_model, q4k_model], ids=["int8", "q4k"])
@pytest.mark.parametrize("policy", ["chain:gamma=3", "eagle2:total_tokens=12,depth=3,top_k=3"])
def test_speculative_decoding_of_a_quantized_target_equals_its_plain_decoding(policy, make_model):
    target = make_model(seed=4)
    draft = tiny_model("qwen2", seed=4, layers=1, sharpen=4.0).float()
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="ar")
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22]]
    plain = [r.token_ids for r in gen.generate_batch(prompts, max_new_tokens=20)]
    spec = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy)
    assert [r.token_ids for r in spec.generate_batch(prompts, max_new_tokens=20)] == plain


def test_native_layers_compute_what_the_lean_layers_compute():
    """The native decoder layer (one C++ call) is the same model as the lean one (torch ops around the same GGUF
    linears): logits agree to float rounding over a prefill and a tree (a wrong rotary, slot or mask would not)."""
    prefix = [int(t) for t in torch.randint(3, VOCAB, (45,), generator=torch.Generator().manual_seed(6))]
    tokens, positions = torch.tensor([[7, 10, 11]]), torch.tensor([[45, 46, 46]])
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    results = []
    for native in (True, False):
        runner = CausalLMRunner(q4k_model(seed=3, native=native))
        last = runner.prefill([prefix])
        runner.begin_block()
        results.append(torch.cat([last, runner.forward(tokens, positions, mask)[0]]))
    native, lean = results
    assert not torch.equal(native, lean)  # two implementations (summation orders differ) ...
    torch.testing.assert_close(native, lean, rtol=1e-3, atol=1e-3)  # ... of one model


def test_native_layers_reuse_their_buffers_without_reading_what_an_earlier_call_left():
    """A thread keeps the native layer's working buffers from one call to the next (decoder_layer.cpp). A model whose
    inputs are zero-padded (hidden 320, intermediate 640, in blocks of 256) gives bitwise the same logits before and
    after a wider model (512: no padding) wrote real values where the padding columns lie; a padding read as left
    would change the activations' block scales."""
    prompt = [int(t) for t in torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(8))]
    padded, wide = q4k_model(seed=5, hidden=320), q4k_model(seed=5, hidden=512)
    before = CausalLMRunner(padded).prefill([prompt])
    CausalLMRunner(wide).prefill([prompt + prompt])  # more rows than before: the buffers grow, then hold its values
    assert torch.equal(CausalLMRunner(padded).prefill([prompt]), before)


def test_the_native_stack_is_bitwise_the_stock_forward_around_native_layers():
    """`NativeStack` (embedding, native calls on one buffer, norm, lm_head) skips the stock forward's machinery but
    not its arithmetic: prefill, a tree and a padded batch give bitwise the logits of the stock forward."""
    prefixes = [[int(t) for t in torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(length))]
                for length in (45, 30)]
    tokens, positions = torch.tensor([[7, 10, 11], [3, 4, 0]]), torch.tensor([[45, 46, 46], [30, 31, 32]])
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]], [[1, 0, 0], [1, 1, 0], [1, 1, 1]]], dtype=torch.bool)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    model = q4k_model(seed=4)
    results = []
    for stack in (True, False):
        runner = CausalLMRunner(model)
        assert runner.native is not None
        if not stack:
            runner.native = None
        last = runner.prefill(prefixes)
        runner.begin_block()
        results.append((last, runner.forward(tokens, positions, mask, token_valid=valid)))
    for fast, stock in zip(*results, strict=True):
        assert torch.equal(fast, stock)


def test_a_prefill_computes_only_keys_and_values_in_the_last_layer_for_rows_it_does_not_keep(monkeypatch):
    """A prefill keeps each sequence's last logits only, so the native stack's last layer attends and runs o_proj and
    the MLP for those rows alone (`decoder_layer_kept`): the logits and every cached key and value are bitwise those
    of the full layer, for a padded batch."""
    from castspec.models import native_layer

    prefixes = [[int(t) for t in torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(length))]
                for length in (45, 30)]
    model = q4k_model(seed=4)
    seen, full_kept_rows = [], native_layer.kept_rows

    def spy(*args):
        seen.append(full_kept_rows(*args))
        return seen[-1]

    monkeypatch.setattr(native_layer, "kept_rows", spy)
    skipping = CausalLMRunner(model)
    logits = skipping.prefill(prefixes)
    assert seen[-1].tolist() == [44, 45 + 29]  # flat rows of [2, 45]: each sequence's last position
    monkeypatch.setattr(native_layer, "kept_rows", lambda *args: None)
    full = CausalLMRunner(model)
    assert torch.equal(logits, full.prefill(prefixes))
    assert torch.equal(skipping.cache.kv, full.cache.kv)


@pytest.mark.parametrize("keep, expected", [
    (torch.tensor([[4], [2]]), [4, 7]), (1, [4, 9]), (2, [3, 4, 8, 9]), (0, None), (5, None),
    (torch.tensor([[0, 1, 2], [0, 1, 2]]), None),  # more than half of the rows: computing them all costs no more
    (torch.ones(2, 5, dtype=torch.bool), None),
])
def test_kept_rows_reads_logits_to_keep_as_transformers_does(keep, expected):
    from castspec.models.native_layer import kept_rows

    rows = kept_rows(keep, 2, 5)
    assert (rows if rows is None else rows.tolist()) == expected


def test_native_layers_run_whenever_the_runner_attends_canonically(monkeypatch):
    """Targets (and native drafts) never fall back to the lean path within one cache: mixing would break exactness."""
    from castspec.models.lean import LeanDecoderLayer

    model = q4k_model(seed=3)
    monkeypatch.setattr(LeanDecoderLayer, "forward", lambda *a, **k: pytest.fail("lean path taken"))
    for canonical in (True, False):  # a runner asked not to be canonical still is, for native layers
        runner = CausalLMRunner(model, canonical=canonical)
        runner.prefill([[5, 6, 7]], budget=4)
        decode_alone(model, [5, 6, 7], [8, 9])
        assert runner.canonical


def test_q4k_rows_joining_and_leaving_a_live_batch_stay_exact():
    """Native layers under continuous batching: rows join (the cache is merged), leave (it is compacted, a view of
    the buffer) and are cancelled; every finished row equals its own plain decoding in the same format."""
    from castspec.verify import SamplingConfig, TokenChooser
    from tests.conftest import drive_live_batch

    target = q4k_model(seed=4)
    draft = tiny_model("qwen2", seed=4, layers=1, sharpen=4.0).float()
    prompts, budgets = [[5, 6, 7, 8, 9], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36], [40, 41]], [12, 4, 10, 8]
    spec = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="eagle2:total_tokens=10,depth=3,top_k=3")
    arrivals = {0: [0], 1: [1, 2], 3: [3]}
    joins = {step: (keys, [prompts[k] for k in keys], [budgets[k] for k in keys],
                    [TokenChooser(SamplingConfig()) for _ in keys]) for step, keys in arrivals.items()}
    outs = drive_live_batch(spec, joins, {2: [2]})  # row 2 is cancelled at step 2
    plain = SpeculativeGenerator(target, ToyTokenizer(), policy="ar")
    for key in (0, 1, 3):
        assert outs[key] == plain.generate(prompts[key], max_new_tokens=budgets[key]).token_ids, key


@pytest.mark.parametrize("dtype", ["int8", "q4k"])
def test_cli_generates_with_a_quantized_target(tmp_path, capsys, dtype):
    """`--target-dtype int8|q4k` end to end on a tiny saved model: speculative output equals the format's plain
    decoding."""
    import json

    from castspec.cli import main
    from tests.test_cli import save_tiny

    hidden = 256 if dtype == "q4k" else 32  # q4k's blocks hold 256 inputs
    target, draft = save_tiny(tmp_path / "t", seed=0, hidden=hidden), save_tiny(tmp_path / "d", seed=0, layers=1)
    code = main(["generate", "--target", target, "--draft", draft, "--target-dtype", dtype, "--policy", "chain",
                 "--prompt", "hello world", "--max-new-tokens", "10", "--json", "--compare"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ar"]["identical"] is True and result["new_tokens"] == 10


def test_a_q4k_draft_with_padded_inputs_runs_native_layers(tmp_path, capsys):
    """`--draft-quant q4k`: the draft (96 inputs: zero-padded to one block) runs native layers; the output still
    equals the target's plain decoding."""
    import json

    from castspec import api
    from castspec.cli import main
    from castspec.models.native_layer import NativeDecoderLayer
    from tests.test_cli import save_tiny

    target, draft = save_tiny(tmp_path / "t", seed=0), save_tiny(tmp_path / "d", seed=0, layers=1, hidden=96)
    gen = api.load_generator(target, draft, policy="chain", draft_quant="q4k")
    assert sum(isinstance(m, NativeDecoderLayer) for m in gen.models["draft"].modules()) == 1
    assert gen.models["draft"].lm_head.qtype == "Q4_K"  # a draft's head need not be finer than its layers
    code = main(["generate", "--target", target, "--draft", draft, "--draft-quant", "q4k", "--policy", "chain",
                 "--prompt", "hello world", "--max-new-tokens", "10", "--json", "--compare"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ar"]["identical"] is True and result["new_tokens"] == 10


@pytest.mark.parametrize("make_model", [int8_model, q4k_model, q4k_lean_model, fast_fp32_model],
                         ids=["int8", "q4k", "q4k-lean", "fp32-onednn"])
def test_a_long_prefill_read_causally_equals_decoding(make_model):
    """A prompt long enough that prefill attention is computed in causal slices (each reads only the key chunks
    its queries can see, `attention.CAUSAL_SLICE`): its last logits equal, bitwise, the last token decoded alone
    after the rest, and the keys of a prefix equal the prefix's own prefill."""
    from castspec.models import attention

    model = make_model(seed=7, hidden=64)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    length = attention.QUERY_CHUNK // groups + 3 * attention.CHUNK + 5  # more queries than one slice holds
    prompt = [int(t) for t in torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(2))]
    runner = CausalLMRunner(model)
    last = runner.prefill([prompt])[0]
    assert torch.equal(last, decode_alone(model, prompt[:-1], prompt[-1:])[0])
    short = CausalLMRunner(model)
    short.prefill([prompt[:100]])
    assert torch.equal(runner.cache.kv[..., :100, :], short.cache.kv[..., :100, :])


def tree_commit(runner: CausalLMRunner, root: int, kept: int, rejected: int) -> None:
    """One step as the engine takes it: root plus two sibling children verified, the second child accepted."""
    runner.begin_block()
    mask = torch.tensor([[[True, False, False], [True, True, False], [True, False, True]]])
    positions = runner.next_pos[:, None] + torch.tensor([[0, 1, 1]])
    runner.forward(torch.tensor([[root, rejected, kept]]), positions, mask)
    runner.commit(torch.tensor([[0, 2]]), torch.tensor([2]))


@pytest.mark.parametrize("make_model", [int8_model, q4k_model, q4k_lean_model, fast_fp32_model],
                         ids=["int8", "q4k", "q4k-lean", "fp32-onednn"])
def test_a_prompt_that_extends_the_kept_prefix_runs_only_the_rest_and_gets_the_same_bits(make_model):
    """The next turn of a conversation: its prompt starts with the last sequence's prompt and accepted tokens. The
    runner runs only the tokens after them, and the last logits and every cached key and value equal, bitwise, a
    fresh prefill of the whole prompt (the reused ones came from a prefill and from a tree with a rejected node)."""
    model = make_model(seed=8, hidden=256)
    generator = torch.Generator().manual_seed(3)
    first = [int(t) for t in torch.randint(3, VOCAB, (70,), generator=generator)]
    runner = CausalLMRunner(model)
    runner.prefill([first], budget=16)
    tree_commit(runner, root=11, kept=12, rejected=13)
    runner.keep_rows([])  # the sequence is done
    later = first + [11, 12] + [int(t) for t in torch.randint(3, VOCAB, (25,), generator=generator)]
    last = runner.prefill([later])
    assert runner.prefilled_tokens == 25
    fresh = CausalLMRunner(model)
    assert torch.equal(last, fresh.prefill([later]))
    assert fresh.prefilled_tokens == len(later)
    assert torch.equal(runner.cache.kv[..., :len(later), :], fresh.cache.kv[..., :len(later), :])
    assert runner.cache.ids[0, :len(later)].tolist() == later


def test_the_kept_prefix_ends_where_the_prompts_differ_and_never_covers_the_last_token():
    model = int8_model(seed=9)
    runner = CausalLMRunner(model)
    prompt = list(range(3, 40))
    runner.prefill([prompt])
    other = prompt[:20] + [50, 51]
    reference = CausalLMRunner(model).prefill([other])
    assert torch.equal(runner.prefill([other]), reference) and runner.prefilled_tokens == 2
    assert torch.equal(runner.prefill([other]), reference) and runner.prefilled_tokens == 1  # the same prompt again
    runner.reuse_prefix = False
    assert torch.equal(runner.prefill([other]), reference) and runner.prefilled_tokens == len(other)


def test_a_row_that_leaves_a_live_batch_is_kept_as_a_copy():
    """Rows leave a live batch while others go on writing the same buffer: the kept prefix must not see that."""
    model = q4k_model(seed=10)
    generator = torch.Generator().manual_seed(4)
    prompts = [[int(t) for t in torch.randint(3, VOCAB, (n,), generator=generator)] for n in (30, 45)]
    runner = CausalLMRunner(model)
    runner.prefill(prompts, budget=8)
    runner.keep_rows([0])  # the longer row (45 tokens) leaves; row 0 moves nowhere, row 1's slots are reused below
    for token in (20, 21, 22):
        tree_commit(runner, root=token, kept=token + 10, rejected=token + 20)
    later = prompts[1] + [7, 8, 9]
    last = runner.add_rows([later])
    assert runner.prefilled_tokens == 3
    assert torch.equal(last[0], CausalLMRunner(model).prefill([later])[0])
