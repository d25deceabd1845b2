"""Tiny randomly initialised models (float64, so that argmax ties cannot flip) shared by the tests.

`CASTSPEC_TEST_DEVICE=cuda` runs the exactness tests (tests/test_exactness.py, tests/test_batch.py) on that device,
in float32 unless `CASTSPEC_TEST_DTYPE` says otherwise (`make gpu-check` does this); every other test stays on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 97
TEST_DEVICE = torch.device(os.environ.get("CASTSPEC_TEST_DEVICE", "cpu"))
_DEFAULT_DTYPE = "float64" if TEST_DEVICE.type == "cpu" else "float32"
TEST_DTYPE = getattr(torch, os.environ.get("CASTSPEC_TEST_DTYPE", _DEFAULT_DTYPE))


def tiny_config(arch: str, layers: int = 2, hidden: int = 32, seed_offset: int = 0):
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                                layer_types=["sliding_attention", "full_attention"][:layers] * (layers // 2 or 1))
    raise ValueError(arch)


def tiny_model(arch: str, seed: int, layers: int = 2, hidden: int = 32, sharpen: float = 1.0):
    """A random model; `sharpen` scales the output head so distributions are peaked (drafts then agree more)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, hidden), dtype=torch.float64,
                                             attn_implementation="sdpa")
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model.eval()


def on_test_device(model):
    """A tiny model on the device and dtype the exactness tests run on (the CPU in float64 unless asked otherwise)."""
    return model.to(device=TEST_DEVICE, dtype=TEST_DTYPE)


@pytest.fixture(scope="session", params=["qwen2", "llama", "gemma3"])
def arch(request):
    return request.param


def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding the obvious way: recompute the full sequence every step, no cache."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids], device=model.device)).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if token == model.config.eos_token_id:
                break
    return out


class ToyTokenizer:
    """Enough of a tokenizer for the engine: ids pass through, text is space-separated ids."""

    eos_token_id = 2
    chat_template = None

    def __call__(self, text):
        return {"input_ids": [int(t) % VOCAB for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def drive_live_batch(gen, joins: dict[int, tuple[list[int], list[list[int]], list[int], list]],
                     leaves: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
    """Step a live batch until it empties: before step s, `leaves[s]` keys leave and `joins[s]` = (keys, prompts,
    budgets, choosers) join. Returns each key's emitted tokens."""
    state = gen.open_batch()
    outs: dict[int, list[int]] = {}
    leaves = leaves or {}
    step = 0
    while step <= max(joins) or state.rows:
        gen.remove_rows(state, leaves.get(step, []))
        events = gen.add_rows(state, *joins[step]) if step in joins else []
        events += gen.step(state)
        for key, tokens, _ in events:
            outs.setdefault(key, []).extend(tokens)
        step += 1
    return outs
