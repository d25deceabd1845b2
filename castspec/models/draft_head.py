"""A draft whose output head covers part of the vocabulary: the token ids below a size, plus a few kept ids (EOS).

On a CPU the draft's lm_head is a large part of a draft forward (Qwen2.5-0.5B: 896 x 151,936 weights, 0.14 G of
the model's 0.63 G), and the engine then takes a log-softmax and top-k over every column. In Qwen's byte-level BPE,
low ids are the early (frequent) merges; on the target's own greedy output in `benchmarks/tasks` (HumanEval and six
Spec-Bench tasks) 1.6-9.3% of tokens have ids >= 65,536 and 4.7-15.7% ids >= 32,768 (EOS ids are kept anyway).

Lossless by construction. The draft only *proposes*: the engine drafts each node's children as the top-k of the
draft's distribution, deterministically, and the verifier (`castspec.verify`) decides with the target's own token
at each position (its argmax, or one draw from its distribution); no ratio of draft probabilities enters the
verification (the proposal is a point mass, see `verify`'s docstring). The reduced draft's distribution is a proper
one over the full vocabulary, softmax over the kept columns and exactly zero elsewhere, so the children it ranks are
the top-k of that distribution, and a token it never proposes simply ends the accepted path there, where the target
emits it as the step's own token. What the draft feeds back into its cache are the accepted tokens, whatever their
id (the input embedding is kept whole).

Column j of the reduced head's logits is token `ids[j]`; `draft_vocab_ids(model)` gives that map, or None when
column j is token j (the full head).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from castspec.errors import CastspecError

__all__ = ["draft_vocab_ids", "draft_vocab_size", "reduce_draft_vocab"]

_IDS = "castspec_vocab_ids"


def reduce_draft_vocab(model: nn.Module, size: int, keep: Iterable[int] = ()) -> int:
    """Cut `model`'s output head to the rows of token ids < `size` and the ids in `keep`, in place.

    Call it before other kernel transforms (int8, oneDNN): it reads a float `nn.Linear` head (a oneDNN-packed one
    too). The input embedding is untouched, also when the head was tied to it. `size` <= 0, or >= the head's rows,
    keeps the full head. Returns the number of columns the draft's logits have now.
    """
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise CastspecError(f"cannot reduce the draft's vocabulary: its output head is {type(head).__name__}, "
                            "expected a float linear layer (reduce before quantizing)")
    weight = head.weight
    rows = weight.shape[0]
    if getattr(model, _IDS, None) is not None:
        raise CastspecError("the draft's vocabulary is already reduced")
    if size <= 0 or size >= rows:
        return rows
    extra = sorted({int(i) for i in keep if size <= int(i) < rows})
    ids = torch.cat([torch.arange(size), torch.tensor(extra, dtype=torch.long)]).to(weight.device)
    bias = getattr(head, "bias", None)
    new = nn.Linear(weight.shape[1], len(ids), bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight.detach().index_select(0, ids))
        if bias is not None:
            new.bias.copy_(bias.detach().index_select(0, ids))
    new.train(head.training)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head has its own (reduced) weight now; nothing re-ties it
    model.set_output_embeddings(new)
    setattr(model, _IDS, ids)
    return len(ids)


def draft_vocab_ids(model: nn.Module) -> torch.Tensor | None:
    """Token id of each column of `model`'s logits [V'] if its head was reduced, else None (column j is token j)."""
    return getattr(model, _IDS, None)


def draft_vocab_size(model: nn.Module) -> int:
    """How many tokens `model` can propose: its logits' width."""
    ids = draft_vocab_ids(model)
    return int(ids.shape[0]) if ids is not None else int(model.config.vocab_size)
