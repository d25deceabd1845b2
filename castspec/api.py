"""Load a target/draft pair by name or path and build a generator — the Python entry point.

    from castspec import load_generator
    gen = load_generator("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", policy="cast")
    result = gen.generate("def fibonacci(n):", max_new_tokens=64)
    print(result.text, result.stats.tokens_per_s)
"""

from __future__ import annotations

import os
import sys

import torch

from castspec.cost.profiler import load_or_profile
from castspec.cost.table import OnlineCosts
from castspec.drafters.suffix import SuffixDrafter
from castspec.engine import SpeculativeGenerator
from castspec.errors import CastspecError
from castspec.models import DRAFT_QUANTS, TARGET_DTYPES
from castspec.models.attention import use_tree_attention
from castspec.models.draft_head import reduce_draft_vocab
from castspec.models.format_choice import choose_target_dtype
from castspec.models.formats import quantize_int8_rows
from castspec.models.gguf_format import use_gguf_linears
from castspec.models.greedy_head import use_greedy_head
from castspec.models.kernels import quantize_draft_int8, use_fast_cpu_linears
from castspec.models.lean import use_lean_layers
from castspec.models.load import load_model, load_tokenizer, resolve_model_dir
from castspec.models.native_layer import use_native_layers
from castspec.policies import TreePolicy, make_policy
from castspec.runtime import ModelRuntime

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"
DEFAULT_POLICY = "cast"
NO_DRAFT = "none"  # draft="none": speculate without a draft model (suffix matching over the prompt and output)
AUTO_DRAFT = "auto"  # the built-in draft if it shares the target's tokenizer, else none (with a notice)


def resolve_draft(target: str, draft: str | None) -> str | None:
    """`draft`, with "auto" decided: the default draft when its tokenizer is the target's, else "none" (one notice
    line: most models have no small sibling, and castspec then speculates on repeats of the text alone)."""
    if draft is None or draft.strip().lower() != AUTO_DRAFT:
        return draft
    if resolve_model_dir(target) == resolve_model_dir(DEFAULT_DRAFT):
        return NO_DRAFT  # the target is the default draft itself: nothing smaller to draft with
    if load_tokenizer(target).get_vocab() == load_tokenizer(DEFAULT_DRAFT).get_vocab():
        return DEFAULT_DRAFT
    print(f"castspec: the default draft '{DEFAULT_DRAFT}' has another tokenizer than '{target}'; speculating "
          "without a draft model (--draft none; give --draft MODEL to use one)", file=sys.stderr)
    return NO_DRAFT
# The draft proposes only token ids below this (plus the EOS ids); 0 = the whole vocabulary. Measured on the AVX2
# host (benchmarks/draft_cost): see `castspec.models.draft_head` and the CLI's --draft-vocab help.
DEFAULT_DRAFT_VOCAB = 65536
DRAFT_VOCAB_ENV = "CASTSPEC_DRAFT_VOCAB"  # overrides DEFAULT_DRAFT_VOCAB where draft_vocab is not given


def load_generator(target: str = DEFAULT_TARGET, draft: str | None = AUTO_DRAFT,
                   policy: TreePolicy | str = DEFAULT_POLICY, device: str = "cpu", fast_kernels: bool = True,
                   draft_quant: str = "auto", cost_table: str | None = None,
                   max_batch_size: int = 1, target_dtype: str = "auto",
                   draft_vocab: int | None = None, suffix: bool = False,
                   draft_window: int = 0, suffix_cache: int = 0,
                   lazy_draft: bool | None = None) -> SpeculativeGenerator:
    """Load models and build a `SpeculativeGenerator`.

    On CPU, `fast_kernels` runs every fp32 linear of both models on oneDNN with pre-packed weights (the `ar`
    baseline gets them too, so speedups compare like with like); `draft_quant="int8"` quantizes the draft's linears
    to int8, which makes drafting ~3x cheaper and cannot change the output (the target decides every token);
    `"q4k"` quantizes them to Q4_K and runs each draft layer as one native call (`castspec.models.native_layer`,
    AVX2 CPUs), cheaper again; `"auto"` picks q4k beside a q4k target, else int8.
    Both are ignored on CUDA. Policies that size trees from measured costs (`cast`) get the cost table at
    `cost_table`, or the one cached for this device and pair, or a quick profile made now; pass the largest batch
    you will give `generate_batch` as `max_batch_size`, so the profile covers it (else costs are looked up for the
    wrong batch size, with a warning).

    `target_dtype` is the target's format: "fp32" (the GGUF's weights dequantized, the exact reference), "int8"
    (CPU only: int8 weights per output channel, activations scaled per row so each token's logits are bitwise
    independent of what else shares the forward; ~3x fewer bytes per step, a different model than fp32 — greedy
    output equals *its own* plain decoding, see `castspec.models.formats`), "q4k" (CPU with AVX2: the GGUF's own
    Q4_K blocks, `castspec.models.gguf_format` and `castspec.models.native_layer`), or "auto" (the default): the
    fastest format measured here among those whose quality passed the check against fp32 for this model
    (`castspec.models.format_choice`; fp32 for models without a check).

    `suffix` (with a draft model): each node's candidates also include what followed the same text earlier in the
    prompt or output (`castspec.drafters.suffix.MixedDrafter`); lossless like any draft. `draft_window` N > 0: the
    draft model is prefilled on each prompt's last N tokens only (long prompts cost the draft far less).
    `suffix_cache` N > 0 (with `suffix` or `draft="none"`): repeats are also looked up in the outputs of the last N
    sequences this generator finished (useful to a server whose requests resemble each other). `lazy_draft` (with a
    draft model): speculate from repeats first and prefill the draft model only once it has earned its prefill
    (`castspec.drafters.lazy`: long prompts with short or copy-heavy answers then skip the draft's prefill); None
    (the default): lazy for policies that size trees from measured costs (`cast`), unless `suffix` or
    `draft_window` asks for another way (`resolve_lazy_draft`).

    `draft="auto"`: the default draft if it has the target's tokenizer, else none. `draft="none"`: speculate without
    a draft model; candidates come from repeats in the prompt and the output so
    far (`castspec.drafters.suffix`), free to propose, verified by the target like any draft.

    `draft_vocab` N > 0: the draft proposes only token ids below N and the EOS ids (its output head keeps those rows
    only, `castspec.models.draft_head`), which makes each draft forward cheaper; 0: the whole vocabulary; None:
    `$CASTSPEC_DRAFT_VOCAB` if set, else `DEFAULT_DRAFT_VOCAB`. Lossless either way (the draft only proposes; the
    target decides every token, greedy or sampled). With `fast_kernels` on CPU the draft's decoder layers also run
    lean (`castspec.models.lean`: q/k/v and gate/up as one matmul each, far fewer torch calls per layer).
    """
    policy = make_policy(policy) if isinstance(policy, str) else policy
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise CastspecError(f"max_batch_size must be a whole number >= 1, got {max_batch_size!r}")
    target_dtype, draft_quant = resolve_formats(target, device, target_dtype, draft_quant)
    draft_vocab = resolve_draft_vocab(draft_vocab)
    draft = resolve_draft(target, draft) if policy.uses_draft else None
    target_only = isinstance(draft, str) and draft.strip().lower() == NO_DRAFT
    lazy_draft = resolve_lazy_draft(lazy_draft, policy, suffix, draft_window)
    if suffix_cache and not (suffix or lazy_draft or target_only):
        raise CastspecError("suffix_cache (--suffix-cache) needs suffix drafting: add --suffix, --lazy-draft or "
                            "--draft none")
    target_model, tokenizer = load_model(target, device=device)
    draft_model = None
    if policy.uses_draft and not target_only:
        if draft is None:
            raise CastspecError(f"policy '{policy.name}' needs a draft model (--draft, or --draft none)")
        same = resolve_model_dir(draft) == resolve_model_dir(target)
        draft_model, draft_tokenizer = load_model(draft, device=device)
        if not same:
            check_same_tokenizer(tokenizer, draft_tokenizer, target, draft)
    on_cpu = torch.device(device).type == "cpu"
    target_runtime = prepare_target(target_model, target, target_dtype, fast_kernels and on_cpu)
    runtimes = {"target": target_runtime}
    if draft_model is not None:
        eos = _eos_token_ids(target_model, tokenizer)
        runtimes["draft"] = prepare_draft(draft_model, draft_quant if on_cpu else "none", draft_vocab, eos,
                                          fast_kernels and on_cpu)
    costs = None
    if getattr(policy, "needs_costs", False):
        costs = OnlineCosts(load_or_profile(runtimes, path=cost_table, max_batch_size=max_batch_size))
    drafter = runtimes.get("draft")
    if target_only and policy.uses_draft:
        drafter = SuffixDrafter(target_model.device, cache_size=suffix_cache)
    return SpeculativeGenerator(target_runtime, tokenizer, draft=drafter, policy=policy, costs=costs, suffix=suffix,
                                draft_window=draft_window, suffix_cache=suffix_cache, lazy_draft=lazy_draft)


def resolve_lazy_draft(lazy_draft: bool | None, policy: TreePolicy, suffix: bool, draft_window: int) -> bool:
    """None: buy the draft model lazily wherever its price can be weighed, i.e. under a policy with a cost table
    (`cast`), unless the caller chose to merge repeats into every tree (`suffix`) or to cut the draft's prefill
    (`draft_window`). Measured (README, "Drafting from the text itself"): it spares long prompts the draft's prefill
    and costs the short ones little; without a draft model it has nothing to buy and changes nothing."""
    if lazy_draft is not None:
        return lazy_draft
    return bool(getattr(policy, "needs_costs", False)) and not suffix and not draft_window


def prepare_target(model, name: str, dtype: str, fast_kernels: bool) -> ModelRuntime:
    """The loaded target in its format (`dtype` resolved: fp32, int8 or q4k) on its kernels, as a runtime.
    `fast_kernels`: CPU only (oneDNN-packed fp32 linears; q4k's decoder layers as one native call each)."""
    use_tree_attention(model)
    if dtype == "int8":
        quantize_int8_rows(model)
    elif dtype == "q4k":
        use_gguf_linears(model, gguf_of(name))
        if fast_kernels:  # q4k is its own format: each decoder layer one native call, exact to itself (per row)
            use_lean_layers(model)
            use_native_layers(model)
            use_greedy_head(model)  # greedy tokens through a coarse head and bounds: the same ids, fewer bytes
    if fast_kernels:
        use_fast_cpu_linears(model)
    return ModelRuntime.of(model, "target", dtype)


def prepare_draft(model, quant: str, vocab: int, keep: list[int], fast_kernels: bool) -> ModelRuntime:
    """The loaded draft made cheap (it only proposes, so it may be rounded differently from the target): its output
    head cut to `vocab` ids plus `keep` (0: whole), its linears in `quant` (q4k, int8; anything else: as loaded) and,
    with `fast_kernels` (CPU), lean or native decoder layers; as a runtime."""
    use_tree_attention(model)
    if vocab:
        reduce_draft_vocab(model, vocab, keep=keep)
    if quant == "q4k":
        # quantized here (the 0.5B's 896 inputs are not whole GGUF blocks); its output head in Q4_K too: 39 instead
        # of 72 MB read per forward (14.8 vs 15.7 ms at n = 1, AVX2 host) and no fewer tokens accepted on 6
        # HumanEval prompts (3.33 vs 3.16 per step)
        use_gguf_linears(model, head_qtype="Q4_K")
    if fast_kernels:
        use_lean_layers(model)  # fewer torch calls per layer, q/k/v and gate/up fused (before int8)
        use_native_layers(model)  # a q4k draft's layers: one native call each (others stay lean)
    if quant == "int8":
        quantize_draft_int8(model)
    if fast_kernels:
        use_fast_cpu_linears(model)
    return ModelRuntime.of(model, "draft", quant if quant in ("int8", "q4k") else "fp32")


def resolve_formats(target: str, device: str, target_dtype: str, draft_quant: str) -> tuple[str, str]:
    """The target's and the draft's formats, `auto` resolved (`castspec.models.format_choice`; the draft follows the
    target: q4k beside a q4k target, else int8); a clear error for unknown names and CPU-only formats elsewhere."""
    if target_dtype not in TARGET_DTYPES:
        raise CastspecError(f"target_dtype must be one of {', '.join(TARGET_DTYPES)}, got '{target_dtype}'")
    if draft_quant not in DRAFT_QUANTS:
        raise CastspecError(f"draft_quant must be one of {', '.join(DRAFT_QUANTS)}, got '{draft_quant}'")
    if target_dtype == "auto":
        target_dtype, why = choose_target_dtype(target, device)
        if target_dtype != "fp32":
            print(f"castspec: --target-dtype auto: {target_dtype}, {why}", file=sys.stderr)
    on_cpu = str(device).split(":")[0] == "cpu"
    if target_dtype in ("int8", "q4k") and not on_cpu:
        raise CastspecError(f"--target-dtype {target_dtype} runs on the CPU only; use fp32 on a GPU")
    if draft_quant == "auto":
        draft_quant = "q4k" if target_dtype == "q4k" else "int8"
    if draft_quant == "q4k" and not on_cpu:
        raise CastspecError("--draft-quant q4k runs on the CPU only; use int8 or none on a GPU")
    return target_dtype, draft_quant


def gguf_of(model: str) -> str | None:
    """The GGUF a built-in model was converted from (its blocks are what `q4k` runs), assembled once; None for other
    models, which `q4k` quantizes itself (with a notice)."""
    from castspec.models.packaged import BUILTIN_MODELS, gguf_info

    if model in BUILTIN_MODELS:
        return gguf_info(model)["path"]
    print(f"castspec: {model} is not a built-in model, so q4k quantizes its weights here (round to nearest, coarser "
          "than llama.cpp's quantizer)", file=sys.stderr)
    return None


def resolve_draft_vocab(draft_vocab: int | None) -> int:
    """The draft vocabulary size to use: the argument, else `$CASTSPEC_DRAFT_VOCAB`, else the default."""
    where = "draft_vocab"
    if draft_vocab is None:
        text = os.environ.get(DRAFT_VOCAB_ENV, "").strip()
        if not text:
            return DEFAULT_DRAFT_VOCAB
        where = f"${DRAFT_VOCAB_ENV}"
        try:
            draft_vocab = int(text)
        except ValueError:
            raise CastspecError(f"{where} must be a whole number (0: the whole vocabulary), got '{text}'") from None
    if isinstance(draft_vocab, bool) or not isinstance(draft_vocab, int) or draft_vocab < 0:
        raise CastspecError(f"{where} must be a whole number >= 0 (0: the whole vocabulary), got {draft_vocab!r}")
    return draft_vocab


def _eos_token_ids(model, tokenizer) -> list[int]:
    """The ids the engine stops at (the target's EOS ids): a reduced draft still proposes them."""
    from castspec.engine import _eos_ids

    return sorted(_eos_ids(model, tokenizer))


def check_same_tokenizer(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """A draft is only useful if token ids mean the same thing for both models."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise CastspecError(f"the draft '{draft_name}' has a different tokenizer from the target '{target_name}' "
                            f"({len(draft_tok)} vs {len(target_tok)} tokens); pick a draft from the same family")
