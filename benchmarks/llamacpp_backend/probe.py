"""Could llama.cpp be castspec's target runtime? Two questions, answered on this machine (issue 14).

1. Is it exact to itself? A token's logits decoded alone vs inside a chain or a tree batch (tree = sequence ids per
   token, llama.cpp's own way), and after a commit that removes rejected siblings (cells freed in the middle).
   Bitwise comparison, for flash attention on/off and weight repacking on/off.
2. What does one forward over n new tokens cost (context ~300), the f(n) CAST sizes trees by?

Usage: python benchmarks/llamacpp_backend/probe.py GGUF [--threads 2]   (needs llama-cpp-python, `.[llamacpp]`)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


class Context:
    """One llama.cpp context over a loaded model, with a reusable batch."""

    def __init__(self, llama, model, flash_attn: bool, threads: int, seqs: int = 8):
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 2048, 512, 512, seqs
        params.kv_unified, params.n_threads, params.n_threads_batch = True, threads, threads
        params.flash_attn_type = int(flash_attn)
        self.llama, self.ctx = llama, llama.llama_init_from_model(model, params)
        self.mem = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(512, 0, seqs)
        self.vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))

    def decode(self, items: list[tuple[int, int, list[int]]]) -> list[np.ndarray]:
        """items: (token, position, sequence ids); returns every item's logits."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (token, pos, seqs) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, len(seqs), True
            for j, s in enumerate(seqs):
                b.seq_id[i][j] = s
        assert self.llama.llama_decode(self.ctx, b) == 0
        return [np.ctypeslib.as_array(self.llama.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).copy()
                for i in range(len(items))]

    def prefill(self, prompt: list[int]) -> None:
        for start in range(0, len(prompt), 512):
            self.decode([(t, start + i, [0]) for i, t in enumerate(prompt[start:start + 512])])

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)


def exactness(llama, model, flash_attn: bool, threads: int) -> dict[str, float]:
    """Max |logit difference| against one-by-one decoding, per scenario (0.0 = bitwise equal)."""
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(100, 20000, 120)]
    toks = [int(x) for x in rng.integers(100, 20000, 6)]
    p = len(prompt)
    ctx = Context(llama, model, flash_attn, threads)
    ctx.prefill(prompt)
    ref = [ctx.decode([(t, p + i, [0])])[0] for i, t in enumerate(toks)]
    ctx.close()

    def gap(got: list[np.ndarray], want: list[np.ndarray]) -> float:
        return float(max(np.abs(g - w).max() for g, w in zip(got, want, strict=True)))

    out = {}
    ctx = Context(llama, model, flash_attn, threads)
    ctx.prefill(prompt)
    out["chain of 6 in one forward"] = gap(ctx.decode([(t, p + i, [0]) for i, t in enumerate(toks)]), ref)
    ctx.close()

    ctx = Context(llama, model, flash_attn, threads)
    ctx.prefill(prompt)
    for seq in (1, 2):
        llama.llama_memory_seq_cp(ctx.mem, 0, seq, -1, -1)
    tree = [(toks[0], p, [0, 1]), (999, p, [2]), (toks[1], p + 1, [0]), (1234, p + 1, [1]), (toks[2], p + 2, [0]),
            (4321, p + 2, [1]), (toks[3], p + 3, [0])]
    logits = ctx.decode(tree)
    out["tree: path nodes beside siblings"] = gap([logits[i] for i in (0, 2, 4, 6)], ref[:4])
    for seq in (1, 2):
        llama.llama_memory_seq_rm(ctx.mem, seq, -1, -1)  # commit: rejected siblings leave holes in the cache
    after = [ctx.decode([(toks[i], p + i, [0])])[0] for i in (4, 5)]
    out["after the commit, next tokens one by one"] = gap(after, ref[4:])
    ctx.close()
    return out


def forward_cost(llama, model, flash_attn: bool, threads: int, context: int = 300, repeats: int = 5,
                 ) -> dict[int, float]:
    """Fastest of `repeats` forwards over n new tokens after a `context`-token prompt, in ms."""
    rng = np.random.default_rng(1)
    ctx = Context(llama, model, flash_attn, threads, seqs=1)
    ctx.prefill([int(x) for x in rng.integers(100, 20000, context)])
    costs = {}
    for n in (1, 2, 4, 8, 16, 32):
        times = []
        for _ in range(repeats):
            tokens = [int(x) for x in rng.integers(100, 20000, n)]
            start = time.perf_counter()
            ctx.decode([(t, context + i, [0]) for i, t in enumerate(tokens)])
            times.append(time.perf_counter() - start)
            llama.llama_memory_seq_rm(ctx.mem, 0, context, -1)
        costs[n] = round(1000 * min(times), 1)
    ctx.close()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import llama_cpp as llama

    from castspec.cost.profiler import cpu_description

    llama.llama_backend_init()
    rows = []
    for repack in (True, False):
        params = llama.llama_model_default_params()
        params.use_extra_bufts = repack  # weight repacking (llama.cpp's default: on)
        model = llama.llama_model_load_from_file(args.gguf.encode(), params)
        for flash_attn in (True, False):
            row = {"repack": repack, "flash_attn": flash_attn,
                   "max_logit_gap": exactness(llama, model, flash_attn, args.threads),
                   "forward_ms": forward_cost(llama, model, flash_attn, args.threads)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        llama.llama_model_free(model)
    print(json.dumps({"cpu": cpu_description(), "threads": args.threads, "gguf": args.gguf}))


if __name__ == "__main__":
    main()
