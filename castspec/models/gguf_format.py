"""The `q4k` format: a model's linears run on the GGUF's own Q4_K / Q6_K blocks, exact to itself.

The packaged models ship as Q4_K_M GGUF files; fp32 dequantizes them (6 GB read per token for the 1.5B target) and
int8 rounds them a second time (1.5 GB). `q4k` keeps the blocks as they are (~1 GB) and multiplies them with int8
activations in castspec's own kernels (`castspec/models/native/gguf_kernels.cpp`): per row and block of 256 one
activation scale, exact integer sums, and a fixed reduction order per output. So a token's logits are bitwise the
same alone or inside any tree or batch — the property speculative decoding needs to be lossless against plain
decoding in the same format. The arithmetic is the same kind as llama.cpp's (Q8_K activations), not its bits.
The blocks are reordered once at load into the kernels' layout (8 columns interleaved; Q6_K's 6-bit values one per
byte).

Weights come from the model's GGUF when there is one (the built-in models'): each HF linear is matched to its GGUF
tensor by name, its rows reordered where the GGUF's are (Llama's q/k), and layer 0's are checked against the HF
weights, which transformers dequantized from the very same blocks, so a wrong mapping is an error, never a silently
different model. A model without a GGUF is quantized here (Q4_K, lm_head Q6_K, round to nearest: coarser than
llama.cpp's quantizer; meant for tests and for models that have no GGUF).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from castspec.errors import CastspecError

__all__ = ["GGUFLinear", "QK", "dequantize", "quantize_q4k", "quantize_q6k", "use_gguf_linears"]

QK = 256  # weights per block (GGUF super-block)
GGUF_BYTES = {"Q4_K": 144, "Q6_K": 210}  # per block of 256 weights, as the file stores them
RECORD_BYTES = {"Q4_K": 1184, "Q6_K": 2192}  # per block of 256 inputs and group of 8 columns, in the kernel's layout
# The bytes of a full Q4_K record that a half one keeps (its first 4 sub-blocks: d, dmin, 4 x 8 scales, 4 x 8 mins,
# 4 x 128 nibbles); gguf_kernels.cpp's Q4X8_HALF is their count.
_HALF_KEPT = np.zeros(RECORD_BYTES["Q4_K"], dtype=bool)
for _start, _end in ((0, 32), (32, 64), (96, 128), (160, 672)):
    _HALF_KEPT[_start:_end] = True
HALF_Q4 = int(_HALF_KEPT.sum())  # 608
_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


class QuantizedRows(NamedTuple):
    """Activations as the kernels take them: int8 per row and block of 256, with each block's scale and sums."""

    values: torch.Tensor  # [n, k] int8
    scales: torch.Tensor  # [n, k / 256] float32
    sums16: torch.Tensor  # [n, k / 16] int16: sums of values per 16
    sums32: torch.Tensor  # [n, k / 32] int16: per 32
    count: int


def quantize_rows(x: torch.Tensor, kernels) -> QuantizedRows:
    rows = x.float().contiguous()
    n, k = rows.shape
    quantized = QuantizedRows(torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // QK),
                              torch.empty(n, k // 16, dtype=torch.int16), torch.empty(n, k // 32, dtype=torch.int16), n)
    kernels.quantize_rows(rows.data_ptr(), n, k, quantized.values.data_ptr(), quantized.scales.data_ptr(),
                          quantized.sums16.data_ptr(), quantized.sums32.data_ptr())
    return quantized


def projections(members: list[GGUFLinear], x: torch.Tensor) -> torch.Tensor:
    """Sibling projections of one input (q/k/v, gate/up) side by side: the input is quantized once and each
    member's kernel writes its own columns of one output. Bitwise the same as calling each member (a column's result
    depends on its own blocks and the row only). One member alone is `GGUFLinear.forward`."""
    lead, first = x.shape[:-1], members[0]
    rows = first.quantize_input(x)
    widths = [member.blocks.shape[0] * 8 for member in members]  # whole groups of 8 columns, padding included
    out = torch.empty(rows.count, sum(widths))
    parts, start = [], 0
    for member, width in zip(members, widths, strict=True):
        member.multiply_into(rows, out[:, start: start + width])
        part = out[:, start: start + member.out_features]
        if member.bias is not None:
            part += member.bias
        parts.append(part)
        start += width
    if sum(widths) != sum(member.out_features for member in members):
        out = torch.cat(parts, dim=1)  # drop the padding columns
    return out.reshape(*lead, out.shape[1]).to(x.dtype)


def can_share_input(members: list[nn.Module]) -> bool:
    """`projections` applies: GGUF linears of one input size whose outputs fill whole groups of 8 columns."""
    return all(isinstance(m, GGUFLinear) and m.out_features % 8 == 0 and m.in_features == members[0].in_features
               and m.padded_in == members[0].padded_in for m in members)


class GGUFLinear(nn.Module):
    """y = x W^T (+ b) with W as Q4_K or Q6_K blocks (interleaved by 8 columns, see the kernel source), x quantized to
    int8 per row and block of 256."""

    def __init__(self, blocks: np.ndarray, qtype: str, bias: torch.Tensor | None = None,
                 in_features: int | None = None):
        """`blocks`: the weight's GGUF blocks [out, in / 256 * bytes per block], as the file stores them;
        `in_features`: the input size when the blocks hold zero columns past it (a size not a multiple of 256)."""
        super().__init__()
        from castspec.models.native import library

        self._kernels = library()
        self.qtype, self.out_features = qtype, blocks.shape[0]
        self.padded_in = blocks.shape[1] // GGUF_BYTES[qtype] * QK
        self.in_features = self.padded_in if in_features is None else in_features
        records = interleave(blocks, qtype)
        # the last block's second half only holds zero padding: drop it (the kernel then reads a half record)
        self.half = qtype == "Q4_K" and self.padded_in - self.in_features >= QK // 2
        if self.half:
            records = halve_last_record(records)
        self.register_buffer("blocks", torch.from_numpy(records))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return projections([self], x)

    def quantize_input(self, x: torch.Tensor) -> QuantizedRows:
        """x [..., in] as the kernels take it: rows zero-padded to the blocks' input size, quantized."""
        flat = x.reshape(-1, self.in_features)
        if self.padded_in != self.in_features:  # the blocks' zero columns past the input
            flat = torch.nn.functional.pad(flat, (0, self.padded_in - self.in_features))
        return quantize_rows(flat, self._kernels)

    def multiply_into(self, rows: QuantizedRows, out: torch.Tensor) -> None:
        """Write rows x W^T (no bias) into `out` [n, >= columns], a view whose rows may be longer (one slice of a
        wider output: sibling projections share one quantized input)."""
        matmul = self._kernels.q4k_matmul if self.qtype == "Q4_K" else self._kernels.q6k_matmul
        matmul(self.blocks.data_ptr(), self.blocks.shape[0] * 8, self.padded_in, rows.values.data_ptr(),
               rows.scales.data_ptr(), rows.sums16.data_ptr(), rows.sums32.data_ptr(), rows.count, out.data_ptr(),
               out.stride(0), self.half)

    def dequantized(self) -> torch.Tensor:
        """The weight as float32 (for checks): exactly what the kernel multiplies with."""
        records = self.blocks.numpy()
        weight = deinterleave(whole_last_record(records) if self.half else records, self.qtype, self.padded_in)
        return torch.from_numpy(weight[: self.out_features, : self.in_features])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, " \
               f"bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------- GGUF blocks

def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).reshape(*values.shape, 2)


def quantize_q4k(weight: np.ndarray) -> np.ndarray:
    """GGUF Q4_K blocks [out, in/256*144] of a float weight, round to nearest (min/max per sub-block of 32)."""
    out, k = weight.shape
    w = weight.astype(np.float32).reshape(out, k // QK, 8, 32)
    low = np.minimum(w.min(axis=-1), 0.0)
    step = (w.max(axis=-1) - low) / 15
    d = (step.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    dmin = ((-low).max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(step / np.where(d > 0, d, 1)[..., None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-low / np.where(dmin > 0, dmin, 1)[..., None]), 0, 63).astype(np.uint8)
    unit = d[..., None] * sc
    q = np.rint((w + (dmin[..., None] * mn)[..., None]) / np.where(unit > 0, unit, 1)[..., None])
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(out, k // QK, 4, 2, 32)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(out, k // QK, 128)
    scales = np.empty((out, k // QK, 12), np.uint8)
    scales[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    scales[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    blocks = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), scales, qs], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out, -1))


def quantize_q6k(weight: np.ndarray) -> np.ndarray:
    """GGUF Q6_K blocks [out, in/256*210] of a float weight, round to nearest (one scale per 16)."""
    out, k = weight.shape
    w = weight.astype(np.float32).reshape(out, k // QK, 16, 16)
    step = np.abs(w).max(axis=-1) / 31
    d = (step.max(axis=-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(step / np.where(d > 0, d, 1)[..., None]), -128, 127).astype(np.int8)
    unit = d[..., None] * sc
    q = np.rint(w / np.where(unit > 0, unit, 1)[..., None])
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(out, k // QK, 2, 4, 32)
    ql = np.concatenate([(q[:, :, :, 0] & 15) | ((q[:, :, :, 2] & 15) << 4),
                         (q[:, :, :, 1] & 15) | ((q[:, :, :, 3] & 15) << 4)], axis=-1)  # [out, nb, 2, 64]
    qh = (q[:, :, :, 0] >> 4) | ((q[:, :, :, 1] >> 4) << 2) | ((q[:, :, :, 2] >> 4) << 4) | ((q[:, :, :, 3] >> 4) << 6)
    blocks = np.concatenate([ql.reshape(out, k // QK, 128), qh.reshape(out, k // QK, 64),
                             sc.view(np.uint8), _fp16_bytes(d)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out, -1))


def _decode_q4k(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    """GGUF Q4_K blocks -> d, dmin [out, nb] (fp16), scales, mins [out, nb, 8], q [out, nb, 256] (0..15)."""
    out = blocks.shape[0]
    b = blocks.reshape(out, -1, GGUF_BYTES["Q4_K"])
    d, dmin = b[..., 0:2].copy().view(np.float16)[..., 0], b[..., 2:4].copy().view(np.float16)[..., 0]
    packed = b[..., 4:16]
    sc = np.empty(packed.shape[:2] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    sc[..., 4:] = (packed[..., 8:12] & 15) | ((packed[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    nibbles = b[..., 16:].reshape(out, -1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    return d, dmin, sc, mn, (nibbles & 15).reshape(out, -1, QK)


def _decode_q6k(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    """GGUF Q6_K blocks -> d [out, nb] (fp16), scales [out, nb, 16] (int8), q [out, nb, 256] (0..63)."""
    out = blocks.shape[0]
    b = blocks.reshape(out, -1, GGUF_BYTES["Q6_K"])
    ql, qh = b[..., :128].reshape(out, -1, 2, 2, 32), b[..., 128:192].reshape(out, -1, 2, 1, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=3)  # per half: inputs 0-31, 32-63, 64-95, 96-127
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    d = b[..., 208:210].copy().view(np.float16)[..., 0]
    return d, b[..., 192:208].view(np.int8), (low | (high << 4)).reshape(out, -1, QK)


def _by_groups(a: np.ndarray) -> np.ndarray:
    """[out, nb, ...] -> [out/8, 8, nb, ...], zero rows appended to a whole number of groups of 8 columns."""
    pad = -a.shape[0] % 8
    if pad:
        a = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
    return a.reshape(a.shape[0] // 8, 8, *a.shape[1:])


def _per_column(a: np.ndarray) -> np.ndarray:
    """[G, 8 col, nb, s] -> [G, nb, s * 8]: for each of s entries, the 8 columns' values side by side."""
    return a.transpose(0, 2, 3, 1).reshape(a.shape[0], a.shape[2], -1)


def _halves(d: np.ndarray) -> np.ndarray:
    """[G, 8 col, nb] scales -> [G, nb, 16] bytes: the 8 columns' fp16 values side by side."""
    return _fp16_bytes(d.transpose(0, 2, 1)).reshape(d.shape[0], d.shape[2], 16)


def interleave(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """GGUF blocks [out, ...] -> the kernel's layout [ceil(out/8), nb * record] (see gguf_kernels.cpp)."""
    if qtype == "Q4_K":
        d, dmin, sc, mn, q = (_by_groups(a) for a in _decode_q4k(blocks))
        groups, nb = q.shape[0], q.shape[2]
        q = q.reshape(groups, 8, nb, 8, 4, 2, 4).transpose(0, 2, 3, 4, 1, 6, 5)  # G nb sub g col i half
        nibbles = (q[..., 0] | (q[..., 1] << 4)).reshape(groups, nb, 1024)
        parts = [_halves(d), _halves(dmin), _per_column(sc), _per_column(mn), nibbles]
    elif qtype == "Q6_K":
        d, sc, q = (_by_groups(a) for a in _decode_q6k(blocks))
        groups, nb = q.shape[0], q.shape[2]
        q = q.reshape(groups, 8, nb, 32, 2, 4).transpose(0, 2, 3, 4, 1, 5)  # G nb g half col i
        parts = [_halves(d), _per_column(sc.view(np.uint8)), q.reshape(groups, nb, 2048)]
    else:
        raise ValueError(f"unsupported block type {qtype}")
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(parts[0].shape[0], -1))


def halve_last_record(records: np.ndarray) -> np.ndarray:
    """Q4_K records [G, nb * 1184] whose last block's sub-blocks 4-7 are zero padding -> [G, (nb-1) * 1184 + 608],
    the last record cut to its first four sub-blocks (gguf_kernels.cpp: Q4X8_HALF)."""
    last = records[:, -RECORD_BYTES["Q4_K"]:]
    if last[:, ~_HALF_KEPT].any():
        raise ValueError("the last block's second half is not zero padding")
    return np.ascontiguousarray(np.concatenate([records[:, :-RECORD_BYTES["Q4_K"]], last[:, _HALF_KEPT]], axis=1))


def whole_last_record(records: np.ndarray) -> np.ndarray:
    """The inverse of `halve_last_record`: the half record padded back to a full one with zeros."""
    last = np.zeros((records.shape[0], RECORD_BYTES["Q4_K"]), np.uint8)
    last[:, _HALF_KEPT] = records[:, -HALF_Q4:]
    return np.concatenate([records[:, :-HALF_Q4], last], axis=1)


def deinterleave(records: np.ndarray, qtype: str, in_features: int) -> np.ndarray:
    """The kernel's layout -> float32 weights [ceil(out/8)*8, in] (what the kernel multiplies with)."""
    groups, nb = records.shape[0], in_features // QK
    r = records.reshape(groups, nb, RECORD_BYTES[qtype])

    def columns(part: np.ndarray, dtype) -> np.ndarray:  # [G, nb, s*8 (*2 for fp16)] -> [G*8, nb, s]
        values = np.ascontiguousarray(part).view(dtype)
        return values.reshape(groups, nb, -1, 8).transpose(0, 3, 1, 2).reshape(groups * 8, nb, -1)

    if qtype == "Q4_K":
        d, dmin = columns(r[..., 0:16], np.float16)[..., 0], columns(r[..., 16:32], np.float16)[..., 0]
        sc, mn = columns(r[..., 32:96], np.uint8), columns(r[..., 96:160], np.uint8)
        nib = r[..., 160:].reshape(groups, nb, 8, 4, 8, 4)  # G nb sub g col i
        q = np.stack([nib & 15, nib >> 4], axis=-1).transpose(0, 4, 1, 2, 3, 6, 5)  # G col nb sub g half i
        q = q.reshape(groups * 8, nb, 8, 32).astype(np.float32)
        w = (d.astype(np.float32)[..., None] * sc)[..., None] * q - (dmin.astype(np.float32)[..., None] * mn)[..., None]
    else:
        d, sc = columns(r[..., 0:16], np.float16)[..., 0], columns(r[..., 16:144], np.int8)
        q = r[..., 144:].reshape(groups, nb, 32, 2, 8, 4).transpose(0, 4, 1, 2, 3, 5)  # G col nb g half i
        q = q.reshape(groups * 8, nb, 16, 16).astype(np.float32) - 32
        w = (d.astype(np.float32)[..., None] * sc)[..., None] * q
    return w.reshape(groups * 8, in_features)


def dequantize(blocks: np.ndarray, qtype: str, in_features: int) -> np.ndarray:
    """float32 weights of GGUF blocks, as llama.cpp and transformers dequantize them."""
    import gguf

    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(blocks.shape[0], in_features)


# ---------------------------------------------------------------------------------------------- model surgery

def _linear_slots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear the format replaces: decoder projections and lm_head."""
    from castspec.models.kernels import OneDNNLinear

    return [(name, module) for name, module in model.named_modules()
            if (type(module) is nn.Linear or isinstance(module, OneDNNLinear)) and module.weight.device.type == "cpu"]


def _gguf_name(hf_name: str) -> str | None:
    if hf_name == "lm_head":
        return "output.weight"
    found = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if found and found.group(2) in _HF_TO_GGUF:
        return f"blk.{found.group(1)}.{_HF_TO_GGUF[found.group(2)]}.weight"
    return None


def _llama_row_order(rows: int, heads: int) -> np.ndarray:
    """Row i of the HF weight is row order[i] of the GGUF's (llama.cpp stores Llama's q/k rotary halves
    interleaved)."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _row_order(model: nn.Module, arch: str, hf_name: str, rows: int) -> np.ndarray | None:
    if arch != "llama" or not hf_name.endswith(("q_proj", "k_proj")):
        return None
    config = model.config
    heads = config.num_attention_heads if hf_name.endswith("q_proj") else config.num_key_value_heads
    return _llama_row_order(rows, heads)


def _blocks_from_gguf(tensor, order: np.ndarray | None) -> tuple[np.ndarray, str]:
    qtype = tensor.tensor_type.name
    if qtype not in ("Q4_K", "Q6_K"):
        raise CastspecError(f"--target-dtype q4k runs Q4_K and Q6_K blocks; the GGUF's {tensor.name} is {qtype}")
    data = np.asarray(tensor.data)
    if order is not None:
        data = data[order]
    return data, qtype


def _check_same_weight(name: str, module: nn.Module, blocks: np.ndarray, qtype: str, rows: int = 256) -> None:
    """The GGUF blocks must dequantize to the HF weight (which transformers made from them): a mapping check."""
    weight = module.weight.detach()
    got = dequantize(blocks[:rows], qtype, weight.shape[1])
    want = weight[:rows].float().numpy()
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise CastspecError(f"q4k: the GGUF's blocks for {name} are not the model's weights (a different file, or a "
                            f"layout castspec does not know); use --target-dtype fp32 or int8")


def use_gguf_linears(model: nn.Module, gguf_path: str | Path | None = None, head_qtype: str = "Q6_K") -> int:
    """Make every CPU linear of `model` a `GGUFLinear`, in place; returns how many.

    With `gguf_path`, weights are the file's blocks (rows reordered where llama.cpp stores them differently; the
    first layer's are checked against the HF weights); without, they are quantized here (Q4_K, lm_head
    `head_qtype`), with zero columns up to a multiple of 256 inputs where the input size is not one (the 0.5B
    draft's 896; a last half block of only zero columns is then not stored, see `halve_last_record`).
    """
    from castspec.models.kernels import _replace_modules
    from castspec.models.native import library

    library()  # fail early, in one line, where the kernels cannot run
    slots = _linear_slots(model)
    reader = None
    if gguf_path is not None:
        import gguf

        reader = gguf.GGUFReader(str(gguf_path))
        tensors = {t.name: t for t in reader.tensors}
        arch = str(reader.fields["general.architecture"].contents()) if "general.architecture" in reader.fields \
            else ""
    replacements: dict[int, GGUFLinear] = {}
    for name, module in slots:
        weight = module.weight.detach()
        bias = getattr(module, "bias", None)
        if reader is None:
            qtype = head_qtype if name == "lm_head" else "Q4_K"
            if qtype not in GGUF_BYTES:
                raise ValueError(f"unsupported block type {qtype}")
            raw = np.pad(weight.float().numpy(), ((0, 0), (0, -weight.shape[1] % QK)))
            blocks = quantize_q6k(raw) if qtype == "Q6_K" else quantize_q4k(raw)
        else:
            key = _gguf_name(name)
            if key == "output.weight" and key not in tensors:
                key = "token_embd.weight"  # tied embeddings
            if key is None or key not in tensors:
                raise CastspecError(f"q4k: the GGUF has no tensor for {name}")
            blocks, qtype = _blocks_from_gguf(tensors[key], _row_order(model, arch, name, weight.shape[0]))
            if re.fullmatch(r"model\.layers\.0\..+|lm_head", name):
                _check_same_weight(name, module, blocks, qtype)
        replacements[id(module)] = GGUFLinear(blocks, qtype, None if bias is None else bias.detach(),
                                              in_features=weight.shape[1])
    del slots
    return _replace_modules(model, lambda module: replacements.pop(id(module), None))
