"""The q4k format: GGUF Q4_K/Q6_K blocks x int8 activations, exact to itself (rows never see their neighbours)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from castspec.errors import CastspecError
from castspec.models.gguf_format import (
    GGUFLinear,
    deinterleave,
    dequantize,
    halve_last_record,
    interleave,
    quantize_q4k,
    quantize_q6k,
    use_gguf_linears,
)
from castspec.models.native import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

GGML = gguf.GGMLQuantizationType


def weight(out: int = 96, k: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((out, k)).astype(np.float32)


@pytest.mark.parametrize("qtype, quantize, tolerance", [("Q4_K", quantize_q4k, 0.1), ("Q6_K", quantize_q6k, 0.03)])
def test_quantizers_write_blocks_gguf_reads_back(qtype, quantize, tolerance):
    """Our blocks are valid GGUF blocks: the gguf package dequantizes them to (near) the original weight."""
    w = weight()
    back = gguf.quants.dequantize(quantize(w), GGML[qtype]).reshape(w.shape)
    assert np.linalg.norm(back - w) / np.linalg.norm(w) < tolerance


@pytest.mark.parametrize("qtype, quantize", [("Q4_K", quantize_q4k), ("Q6_K", quantize_q6k)])
@pytest.mark.parametrize("rows", [96, 13])
def test_the_kernel_layout_keeps_every_weight(qtype, quantize, rows):
    """Interleaving by 8 columns (zero columns padding the last group) loses nothing: it dequantizes to exactly
    what llama.cpp's dequantization of the GGUF blocks gives."""
    blocks = quantize(weight(rows))
    back = deinterleave(interleave(blocks, qtype), qtype, 512)
    assert np.array_equal(back[:rows], dequantize(blocks, qtype, 512)) and not back[rows:].any()


def gguf_linear(qtype: str, bias: bool = True, out: int = 99, k: int = 512) -> GGUFLinear:
    w = weight(out, k)
    blocks = quantize_q4k(w) if qtype == "Q4_K" else quantize_q6k(w)
    b = torch.randn(out, generator=torch.Generator().manual_seed(1)) if bias else None
    return GGUFLinear(blocks, qtype, b)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_gguf_linear_computes_the_product_with_its_blocks(qtype):
    lin = gguf_linear(qtype)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(2))
    ref = x @ lin.dequantized().T + lin.bias
    assert ((lin(x) - ref).norm() / ref.norm()).item() < 0.02  # only the int8 activations differ


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_gguf_rows_are_bitwise_independent_of_their_neighbours_and_threads(qtype):
    """Any row count (tiles of 4 and every remainder), a sibling with a far larger range, one thread or two: a row's
    output is the same bits."""
    lin = gguf_linear(qtype)
    x = torch.randn(70, 512, generator=torch.Generator().manual_seed(3))  # more rows than one chunk of 64
    x[3] *= 50.0
    alone = torch.cat([lin(x[i: i + 1]) for i in range(70)])
    for n in (*range(2, 12), 70):
        assert torch.equal(lin(x[:n]), alone[:n]), n
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(lin(x), alone)
    finally:
        torch.set_num_threads(threads)


def tiny(arch: str, seed: int = 0):
    from tests.conftest import tiny_model

    return tiny_model(arch, seed=seed, hidden=256, sharpen=4.0).float()


def write_gguf(model: nn.Module, path, arch: str, reorder: bool = True) -> None:
    """A GGUF of `model`'s linears (Q4_K, lm_head Q6_K) laid out as llama.cpp writes them, and the model's weights
    set to what those blocks dequantize to (as transformers loads a GGUF)."""
    from castspec.models.gguf_format import _gguf_name, _llama_row_order

    writer = gguf.GGUFWriter(str(path), arch)
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        qtype = GGML.Q6_K if name == "lm_head" else GGML.Q4_K
        raw = (quantize_q6k if name == "lm_head" else quantize_q4k)(module.weight.detach().numpy())
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(module.weight.shape)))
        if reorder and arch == "llama" and name.endswith(("q_proj", "k_proj")):
            heads = model.config.num_attention_heads if name.endswith("q_proj") else model.config.num_key_value_heads
            stored = np.empty_like(raw)
            stored[_llama_row_order(raw.shape[0], heads)] = raw
            raw = stored
        writer.add_tensor(_gguf_name(name), raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_weights_come_from_the_gguf_blocks(tmp_path, arch):
    """Each linear runs exactly its GGUF tensor's blocks (Llama's q/k rows put back in HF order)."""
    model = tiny(arch)
    write_gguf(model, tmp_path / "m.gguf", arch)
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if type(m) is nn.Linear}
    assert use_gguf_linears(model, tmp_path / "m.gguf") == len(dense)
    for name, module in model.named_modules():
        if name in dense:
            assert isinstance(module, GGUFLinear) and torch.equal(module.dequantized(), dense[name]), name


def test_a_gguf_that_is_not_the_model_is_refused(tmp_path):
    """A file whose blocks are not the model's weights (here: Llama q/k rows left in llama.cpp's order) is a clear
    error, never a silently different model."""
    model = tiny("llama")
    write_gguf(model, tmp_path / "m.gguf", "llama", reorder=False)
    with pytest.raises(CastspecError, match="not the model's weights"):
        use_gguf_linears(model, tmp_path / "m.gguf")


def test_a_model_without_a_gguf_is_quantized_here():
    model = tiny("qwen2")
    use_gguf_linears(model)
    kinds = {name: m.qtype for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert kinds["lm_head"] == "Q6_K" and set(kinds.values()) == {"Q4_K", "Q6_K"} and len(kinds) == 2 * 7 + 1
    coarse = tiny("qwen2")
    use_gguf_linears(coarse, head_qtype="Q4_K")
    assert coarse.lm_head.qtype == "Q4_K"
    with pytest.raises(ValueError, match="unsupported block type"):
        use_gguf_linears(tiny("qwen2"), head_qtype="Q8_0")


def test_input_sizes_that_are_not_whole_blocks_are_padded_with_zero_columns():
    """A model quantized here whose inputs are not a multiple of 256 (the 0.5B draft's 896) gets zero columns: its
    linears give what its dequantized weights give, up to the int8 activations."""
    from tests.conftest import tiny_model

    model = tiny_model("qwen2", seed=0, hidden=96).float()
    dense = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    x = {name: torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(5)) for name, m in dense.items()}
    assert use_gguf_linears(model) == 2 * 7 + 1
    for name, module in model.named_modules():
        if name in dense:
            assert module.padded_in == 256 and module.dequantized().shape == dense[name].weight.shape
            ref = x[name] @ module.dequantized().T + (0 if module.bias is None else module.bias)
            assert ((module(x[name]) - ref).norm() / ref.norm()).item() < 0.02, name


@pytest.mark.parametrize("in_features", [128, 384, 896])
def test_a_half_block_of_padding_is_not_stored_and_changes_no_bit(in_features):
    """Inputs 128 past a multiple of 256 (the draft's 896) end in a half record: ~10% fewer bytes at 896 and, since
    the dropped half only held zero padding, bitwise the output of the padded full records, for 1 to 9 rows."""
    from castspec.models.gguf_format import QK

    weight = torch.randn(40, in_features, generator=torch.Generator().manual_seed(3)).numpy()
    blocks = quantize_q4k(np.pad(weight, ((0, 0), (0, -in_features % QK))))
    half = GGUFLinear(blocks, "Q4_K", in_features=in_features)
    full = GGUFLinear(blocks, "Q4_K", in_features=in_features)
    full.half = False
    full.blocks = torch.from_numpy(interleave(blocks, "Q4_K"))
    assert half.half and half.blocks.shape[1] == full.blocks.shape[1] - 1184 + 608
    assert torch.equal(half.dequantized(), full.dequantized())
    for rows in (1, 4, 9):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(half(x), full(x))
    with pytest.raises(ValueError, match="not zero padding"):
        halve_last_record(interleave(quantize_q4k(np.pad(weight, ((0, 0), (0, -in_features % QK)), constant_values=1)),
                                     "Q4_K"))


@pytest.mark.parametrize("broken, message", [("cpu", "lacks avx2"), ("compiler", r"need a C\+\+ compiler")])
def test_where_the_kernels_cannot_run_q4k_is_a_one_line_error(monkeypatch, tmp_path, broken, message):
    from castspec.models import native

    native._library_or_reason.cache_clear()
    monkeypatch.setenv("CASTSPEC_HOME", str(tmp_path))  # no library built here yet
    if broken == "cpu":
        monkeypatch.setattr(native, "_cpu_flags", lambda: {"fma", "f16c"})
    else:
        monkeypatch.setattr(native, "_compiler", lambda: None)
    try:
        with pytest.raises(CastspecError, match=message):
            use_gguf_linears(tiny("qwen2"))
    finally:
        native._library_or_reason.cache_clear()


def test_sibling_projections_sharing_one_quantized_input_equal_each_alone():
    """q/k/v (mixed Q4_K and Q6_K, with biases) through `projections`: one quantization of the input, each member's
    columns of one output, bitwise what each member gives alone."""
    from castspec.models.gguf_format import can_share_input, projections

    members = [gguf_linear("Q4_K", out=64), gguf_linear("Q4_K", out=16), gguf_linear("Q6_K", out=16)]
    x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(4))
    assert can_share_input(members) and not can_share_input([gguf_linear("Q4_K")])  # 99 columns: not whole groups
    assert torch.equal(projections(members, x), torch.cat([m(x) for m in members], dim=-1))


def test_a_q4k_models_cost_table_is_keyed_by_its_blocks_and_kernel_build(tmp_path):
    """A cost table measured with other kernels, or with a head of another block type (blocks are buffers: the
    parameter count does not change), is not this model's: its path differs."""
    from castspec.cost.profiler import expected_meta, model_fingerprint, table_path
    from castspec.models.native import build_key

    fine, coarse = tiny("qwen2"), tiny("qwen2")
    use_gguf_linears(fine)
    use_gguf_linears(coarse, head_qtype="Q4_K")
    print_fine, print_coarse = model_fingerprint(fine), model_fingerprint(coarse)
    assert print_fine["hash"] == print_coarse["hash"] and print_fine["q4k"].startswith(build_key())
    assert table_path(expected_meta({"target": fine}), tmp_path) != table_path(expected_meta({"target": coarse}),
                                                                                 tmp_path)
