"""The target's greedy token without reading its whole output head: exact, by bounds.

Why: a q4k target's output head is the largest matrix it reads (the 1.5B's 151,936 x 1,536 lm_head in Q6_K: ~250 MB
of the ~1.04 GB a decoding step streams, ~10 of ~50 ms at one token on a 2-core AVX2 host), yet greedy decoding and
greedy verification use only each row's argmax.

How, and why it is exact. Beside the head W sits a coarse copy A in Q4_K (~135 MB) and, per column j, a number
`bound[j]` >= ||W_j - A_j||_2 plus a margin for float rounding (below). The exact head multiplies W with the row's
int8 activations x^ (`gguf_format.quantize_rows`), the coarse one multiplies A with the very same x^, so by
Cauchy-Schwarz the exact logit z_j and the coarse c_j differ by at most bound[j] * ||x^||_2. A column whose upper
end c_j + bound[j] ||x^|| lies below the best lower end max_k (c_k - bound[k] ||x^||) is strictly below column k's
exact logit: neither the argmax nor tied with it. The exact kernel then computes the surviving columns only, by
groups of 8 (`matmul_groups`: the full head's own tiles, so bitwise its values), and the first of their maxima is
the token: the same as `logits.argmax(-1)` over the full head, ties included. On HumanEval output (the q4k 1.5B
target, 256 positions) the median row keeps 33 of 151,936 columns, 1 in 10 keeps more than 920, and the worst kept
15,168; the bound held with a factor 7 to spare (largest |z - c| / bound: 0.14).

Float rounding: the kernels' integer sums are exact; their float products and the sum over blocks round with a
relative error of a few units of 2^-24 of sum |w_i x_i| <= ||w|| ||x^||, which the margin (1e-4 of ||W_j|| + ||A_j||
+ the mins' part of A_j, times ||x^||) covers many times over, as it covers the float32 arithmetic of the bounds.

Rows whose coarse logits are not finite fall back to the full head (they would carry no bound).

When it pays. The bounds are loose (Cauchy-Schwarz over 1,536 inputs), so where no token stands out the coarse pass
rules out little: on chat answers (Natural Questions) the median step recomputed 13,900-18,100 of the 18,992 groups,
and coarse + exact cost 1.4-1.8x the full head. So the head keeps a running share of groups recomputed and, while
that share is above `KEEP_LIMIT`, reads the full head directly (the same token: `argmax` of the full logits), trying
the coarse pass again after 8, 16, ... up to 64 calls (that try's share replaces the running one). Either way the
token is the full head's argmax.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from castspec.models.gguf_format import GGUFLinear, quantize_q4k

__all__ = ["GreedyHead", "greedy_head_of", "use_greedy_head"]

# Above this running share of groups recomputed, the full head is cheaper than the coarse pass plus the recompute
# (for the 1.5B: 135 MB coarse + share * 250 MB against 250 MB, break-even ~0.46; a margin for the select pass).
KEEP_LIMIT = 0.3
SHARE_WEIGHT = 0.25  # weight of the newest call in the running share
PROBE_FIRST, PROBE_LAST = 8, 64  # calls on the full head before the coarse pass is tried again (doubling)
# Per column, how much of ||W_j|| etc. the float-rounding margin adds: ~100x what the kernels can round by.
ROUNDING_MARGIN = 1e-4
# Heads smaller than this are rebuilt at each load (fast); larger ones are cached on disk (building the 1.5B's
# takes ~28 s).
CACHE_BYTES = 16 << 20
_VERSION = b"greedy-head-v1"
_ATTRIBUTE = "castspec_greedy_head"


class GreedyHead:
    """An output head's argmax through a coarse copy and bounds (module docstring)."""

    def __init__(self, head: GGUFLinear, coarse: GGUFLinear, bound: torch.Tensor):
        self.head, self.coarse, self.bound = head, coarse, bound  # bound [columns] float32, per unit of ||x^||
        self._kernels = head._kernels
        self.last_groups = 0  # groups of 8 columns the last call computed exactly (for profiles and tests)
        self.share: float | None = None  # running share of groups recomputed by the coarse pass
        self.wait, self.countdown = PROBE_FIRST, 0  # full-head calls until the next try of the coarse pass
        self.full_calls = 0  # calls answered by the full head (for profiles and tests)

    @classmethod
    def build(cls, head: GGUFLinear) -> GreedyHead:
        """The coarse copy and the bounds of `head` (cached under castspec's home for large heads)."""
        path = _cache_path(head) if head.blocks.numel() >= CACHE_BYTES else None
        saved = _load(path, head) if path is not None else None
        if saved is None:
            saved = _coarse_and_bound(head)
            if path is not None:
                _save(path, *saved)
        blocks, bound = saved
        return cls(head, GGUFLinear(blocks, "Q4_K", in_features=head.in_features), bound)

    @torch.inference_mode()
    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., in] -> token ids [...]: the full head's `argmax(-1)`, bitwise."""
        if self._full_is_cheaper():
            self.full_calls += 1
            return self.head(hidden).argmax(dim=-1)
        rows = self.head.quantize_input(hidden)
        groups = self._candidates(rows)
        if groups is None:
            return self.head(hidden).argmax(dim=-1)
        return self._exact_argmax(rows, groups).reshape(hidden.shape[:-1])

    def _candidates(self, rows) -> torch.Tensor | None:
        """The groups of 8 columns the bounds leave for some row, ascending (the coarse pass); None when a coarse
        logit is not finite. Updates the running share of groups kept."""
        coarse = torch.empty(rows.count, self.coarse.blocks.shape[0] * 8)
        self.coarse.multiply_into(rows, coarse)
        norms, kept = _norms(rows), torch.empty(coarse.shape[1] // 8, dtype=torch.long)  # alive through the call
        count = self._kernels.select_groups(coarse.data_ptr(), rows.count, self.head.out_features, coarse.stride(0),
                                            self.bound.data_ptr(), norms.data_ptr(), kept.data_ptr())
        if count < 0:
            return None
        self.last_groups = count
        share = count / kept.numel()  # a try after full-head calls stands alone: the text may have changed
        fresh = self.share is None or self.share >= KEEP_LIMIT
        self.share = share if fresh else self.share + SHARE_WEIGHT * (share - self.share)
        return kept[:count]

    def _exact_argmax(self, rows, groups: torch.Tensor) -> torch.Tensor:
        """Each row's first largest exact logit among `groups`' columns (the full head's own tiles), as a token id."""
        head = self.head
        exact = torch.empty(rows.count, groups.numel() * 8)
        self._kernels.matmul_groups(head.blocks.data_ptr(), int(head.qtype == "Q6_K"), head.padded_in, int(head.half),
                                    groups.data_ptr(), groups.numel(), rows.values.data_ptr(), rows.scales.data_ptr(),
                                    rows.sums16.data_ptr(), rows.sums32.data_ptr(), rows.count, exact.data_ptr(),
                                    exact.stride(0))
        columns = (groups[:, None] * 8 + torch.arange(8)).flatten()
        if head.out_features % 8:  # the last group's padding columns are not the head's
            exact[:, columns >= head.out_features] = -torch.inf
        return columns[exact.argmax(dim=1)]

    def _full_is_cheaper(self) -> bool:
        """Whether to read the full head this call (module docstring, "When it pays")."""
        if self.share is None or self.share < KEEP_LIMIT:
            self.wait, self.countdown = PROBE_FIRST, 0
            return False
        if self.countdown == 0:  # just measured expensive: wait, longer each time
            self.countdown = self.wait
            self.wait = min(2 * self.wait, PROBE_LAST)
        self.countdown -= 1
        return self.countdown > 0


def _cache_path(head: GGUFLinear) -> Path:
    from castspec.models.packaged import castspec_home

    digest = hashlib.blake2b(_VERSION + head.blocks.numpy().tobytes(), digest_size=12).hexdigest()
    return castspec_home() / "greedy_heads" / f"{digest}.pt"


def _load(path: Path, head: GGUFLinear) -> tuple[np.ndarray, torch.Tensor] | None:
    """The cached coarse blocks and bounds of `head`; None when absent or unreadable (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        blocks, bound = saved["blocks"].numpy(), saved["bound"]
    except Exception:  # a truncated or foreign file: build again and replace it
        return None
    if blocks.shape[0] != head.out_features or bound.shape != (head.out_features,) or bound.dtype != torch.float32:
        return None
    return blocks, bound


def _save(path: Path, blocks: np.ndarray, bound: torch.Tensor) -> None:
    """Cache them for the next load; a home that cannot be written only costs the next load the build."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial")  # concurrent builders never share a file
        torch.save({"blocks": torch.from_numpy(blocks), "bound": bound}, partial)
        partial.replace(path)
    except OSError as e:
        print(f"castspec: could not cache the greedy head at {path.parent} ({e.strerror or e}); it will be built "
              "again at the next load", file=sys.stderr)


def _norms(rows) -> torch.Tensor:
    """||x^||_2 of each quantized row (int8 values times their block's scale), rounded up a little, float32."""
    values = rows.values.double().view(rows.count, -1, 256)
    sq = (values.square().sum(dim=2) * rows.scales.double().square()).sum(dim=1)
    return (sq.sqrt() * (1 + 1e-6)).float()


def _coarse_and_bound(head: GGUFLinear, chunk: int = 8192) -> tuple[np.ndarray, torch.Tensor]:
    """A Q4_K copy of `head` (GGUF blocks, round to nearest) and each column's bound (module docstring), float32."""
    weight = head.dequantized().numpy()
    padded = np.zeros((weight.shape[0], head.padded_in), np.float32)
    padded[:, : head.in_features] = weight
    blocks = quantize_q4k(padded)
    approx = GGUFLinear(blocks, "Q4_K", in_features=head.in_features).dequantized().numpy()
    bound = np.empty(weight.shape[0], np.float64)
    root_k = math.sqrt(head.padded_in)
    for start in range(0, weight.shape[0], chunk):
        w = weight[start: start + chunk].astype(np.float64)
        a = approx[start: start + chunk].astype(np.float64)
        error = np.sqrt(np.square(w - a).sum(axis=1))
        size = np.sqrt(np.square(w).sum(axis=1))
        mins = 1.05 * root_k * np.abs(w).max(axis=1)  # >= ||the mins' part of A_j||: each min is at most max |W_j|
        bound[start: start + chunk] = error + ROUNDING_MARGIN * (2 * size + error + 2 * mins)
    return blocks, torch.from_numpy(bound * (1 + 1e-3)).float()


def use_greedy_head(model: torch.nn.Module) -> bool:
    """Give a q4k model's output head a `GreedyHead` (for `greedy_head_of`); False when the head does not qualify (not
    a GGUF linear, or one with a bias)."""
    head = model.get_output_embeddings()
    if not isinstance(head, GGUFLinear) or head.bias is not None:
        return False
    object.__setattr__(head, _ATTRIBUTE, GreedyHead.build(head))
    return True


def greedy_head_of(model: torch.nn.Module) -> GreedyHead | None:
    head = model.get_output_embeddings()
    return getattr(head, _ATTRIBUTE, None)
