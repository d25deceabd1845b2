"""Where one draft forward's time goes: a per-part breakdown through castspec's own runner.

    .venv/bin/python benchmarks/draft_cost/profile_draft.py --out benchmarks/draft_cost/before

Loads the pair as `load_generator` does (draft: fbgemm dynamic int8 linears; target: `--target-dtype`, default
int8), gives each runner a ~300-token cache (`synthetic_context`) and times, for n = 1, 4, 8 new tokens:

* wall: one `CausalLMRunner.forward` (fastest of `--repeats`, no profiler attached), and for the draft also the
  engine's own post-processing of those logits (log-softmax over the vocabulary and top-k children, as
  `DraftLM.expand` and `SpeculativeGenerator._draft` do);
* a torch.profiler breakdown (the fastest of `--profiled` runs) of the same forward: every top-level aten/quantized op
  is charged to the innermost model part it ran in (forward hooks open a `record_function` scope per module):
  linears (the 7 per layer), lm_head, attention (the attention function itself), KV-cache write, norms, rope
  (cos/sin + applying it), MLP activation (silu * up), residual adds and reshapes ("glue"), in lean layers
  (`castspec.models.lean`) their norms, rope, activation and residuals together ("lean_misc"), embedding, and the
  runner's mask building outside the model. "dispatch/Python" is wall minus the sum of op times: Python in
  `transformers`/castspec, module calls, hooks of the stock model, and torch's dispatcher between ops.

Writes `results.json` and `results.md` into `--out`. Variants of the draft (`--draft-vocab`, `--draft-threads`,
`--fuse`) are measured in the same process against the same target, so ratios compare like with like on a shared
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from castspec.cost.profiler import cpu_description  # noqa: E402
from castspec.models.runner import CausalLMRunner  # noqa: E402

PARTS = ["linear", "lm_head", "attention", "kv_write", "norm", "rope", "mlp_act", "lean_misc", "glue", "embed",
         "runner", "post"]
LABEL = "castspec::"


# ---------------------------------------------------------------------------------------------------------------
# loading, as load_generator does


def load_draft(name: str, vocab: int = 0, fuse: bool = False, lean: bool = False):
    from castspec.models.attention import use_tree_attention
    from castspec.models.kernels import quantize_draft_int8, use_fast_cpu_linears
    from castspec.models.load import load_model

    model, tokenizer = load_model(name)
    use_tree_attention(model)
    if vocab:
        from castspec.models.draft_head import reduce_draft_vocab

        reduce_draft_vocab(model, vocab, keep=[tokenizer.eos_token_id or 0])
    if fuse:
        from castspec.models.fuse import fuse_projections

        fuse_projections(model)
    if lean:
        from castspec.models.lean import use_lean_layers

        use_lean_layers(model)
    quantize_draft_int8(model)
    use_fast_cpu_linears(model)
    return model


def load_target(name: str, dtype: str):
    from castspec.models.attention import use_tree_attention
    from castspec.models.kernels import use_fast_cpu_linears
    from castspec.models.load import load_model

    model, _ = load_model(name)
    use_tree_attention(model)
    if dtype == "int8":
        from castspec.models.formats import quantize_int8_rows

        quantize_int8_rows(model)
    use_fast_cpu_linears(model)
    return model


def make_runner(model, role: str) -> CausalLMRunner:
    try:  # targets attend canonically; drafts need not (castspec.models.runner)
        return CausalLMRunner(model, canonical=role != "draft")
    except TypeError:  # a runner without the option
        return CausalLMRunner(model)


# ---------------------------------------------------------------------------------------------------------------
# one forward, as the engine runs it


def one_forward(runner: CausalLMRunner, n: int, role: str, generator: torch.Generator, top_k: int = 8) -> None:
    batch = runner.batch_size
    tokens = torch.randint(3, 30000, (batch, n), generator=generator)
    positions = runner.next_pos[:, None] + torch.arange(n)
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None].expand(batch, -1, -1)
    runner.begin_block()
    logits = runner.forward(tokens, positions, mask)
    if role == "draft":
        with torch.profiler.record_function(LABEL + "post"):
            logp = torch.log_softmax(logits.float(), dim=-1)
            logp.topk(top_k, dim=-1)
    runner.commit(torch.zeros(batch, 0, dtype=torch.long), torch.zeros(batch, dtype=torch.long))


def wall_ms(runner, n, role, repeats, generator) -> dict[str, float]:
    """Fastest forward, and fastest forward + post-processing (draft), in ms, without a profiler."""
    forward, total = [], []
    for _ in range(repeats):
        batch = runner.batch_size
        tokens = torch.randint(3, 30000, (batch, n), generator=generator)
        positions = runner.next_pos[:, None] + torch.arange(n)
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None].expand(batch, -1, -1)
        runner.begin_block()
        t0 = time.perf_counter()
        logits = runner.forward(tokens, positions, mask)
        t1 = time.perf_counter()
        if role == "draft":
            torch.log_softmax(logits.float(), dim=-1).topk(8, dim=-1)
        t2 = time.perf_counter()
        runner.commit(torch.zeros(batch, 0, dtype=torch.long), torch.zeros(batch, dtype=torch.long))
        forward.append((t1 - t0) * 1000)
        total.append((t2 - t0) * 1000)
    return {"forward_ms": min(forward), "step_ms": min(total), "forward_median_ms": statistics.median(forward)}


# ---------------------------------------------------------------------------------------------------------------
# profiler breakdown


def _module_part(name: str, module: torch.nn.Module) -> str | None:
    cls = type(module).__name__
    if name.endswith("lm_head"):
        return "lm_head"
    if "Linear" in cls or "Fused" in cls:
        return "linear"
    if cls.endswith("RMSNorm"):
        return "norm"
    if cls.endswith("RotaryEmbedding"):
        return "rope"
    if cls.endswith("MLP"):
        return "mlp_act"  # what the MLP does besides its linears: silu and the product
    if cls.endswith("Attention"):
        return "rope"  # what attention modules do besides linears, the attention function and the cache: rope, views
    if cls == "LeanDecoderLayer":
        return "lean_misc"  # a lean layer's own ops: norms, rope, silu * up, residual adds
    if cls.endswith("DecoderLayer"):
        return "glue"  # residual adds
    if isinstance(module, torch.nn.Embedding):
        return "embed"
    if cls.endswith("ForCausalLM") or cls.endswith("Model"):
        return "glue"
    return None


class Scopes:
    """Forward hooks that open a profiler scope named after each module's part, and wrappers for the attention
    function and the cache write (functions, not modules)."""

    def __init__(self, model, runner: CausalLMRunner):
        self.handles = []
        self.stack: list = []
        for name, module in model.named_modules():
            part = _module_part(name, module)
            if part is None:
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter(part)))
            self.handles.append(module.register_forward_hook(self._exit))
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.attn_name = model.config._attn_implementation
        self.attn_fn = ALL_ATTENTION_FUNCTIONS[self.attn_name]

        def attention(*args, **kwargs):
            with torch.profiler.record_function(LABEL + "attention"):
                return self.attn_fn(*args, **kwargs)

        ALL_ATTENTION_FUNCTIONS[self.attn_name] = attention
        self.runner = runner

    def _enter(self, part):
        def hook(module, args):
            scope = torch.profiler.record_function(LABEL + part)
            scope.__enter__()
            self.stack.append(scope)
        return hook

    def _exit(self, module, args, output):
        self.stack.pop().__exit__(None, None, None)

    def wrap_cache(self) -> None:
        cache = self.runner.cache
        update = cache.update

        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(LABEL + "kv_write"):
                return update(*args, **kwargs)

        cache.update = wrapped

    def close(self) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        for handle in self.handles:
            handle.remove()
        ALL_ATTENTION_FUNCTIONS[self.attn_name] = self.attn_fn


def breakdown(runner, model, n, role, runs, generator) -> dict:
    """Of the `runs` profiled forwards, the fastest: op time per part (ms), op count, profiled wall (ms)."""
    scopes = Scopes(model, runner)
    per_run: list[dict[str, float]] = []
    counts: list[int] = []
    try:
        for _ in range(runs):
            scopes.wrap_cache()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                with torch.profiler.record_function(LABEL + "runner"):
                    t0 = time.perf_counter()
                    one_forward(runner, n, role, generator)
                    wall = (time.perf_counter() - t0) * 1000
            parts: dict[str, float] = defaultdict(float)
            ops = 0
            for event in prof.events():
                if event.name.startswith(LABEL):
                    continue
                parent = event.cpu_parent
                if parent is None or not parent.name.startswith(LABEL):
                    continue  # not a top-level op (runs inside another op), or outside every scope
                parts[parent.name[len(LABEL):]] += event.cpu_time_total / 1000
                ops += 1
            parts["profiled_wall"] = wall
            per_run.append(parts)
            counts.append(ops)
            del scopes.runner.cache.update  # back to the class method
    finally:
        scopes.close()
    best = min(range(runs), key=lambda i: per_run[i]["profiled_wall"])  # the least disturbed run, whole
    out = {k: round(v, 3) for k, v in per_run[best].items()}
    out["ops"] = counts[best]
    return out


# ---------------------------------------------------------------------------------------------------------------


class Subject:
    """One model as the engine runs it, with a ~`context`-token cache."""

    def __init__(self, key: str, model, role: str, context: int, threads: int, info: dict):
        self.key, self.model, self.role, self.threads, self.info = key, model, role, threads, info
        with self.thread_count():
            self.runner = make_runner(model, role)
            self.runner.synthetic_context(1, context, seed=7)
        self.generator = torch.Generator().manual_seed(0)
        self.walls: dict[int, list[dict[str, float]]] = defaultdict(list)

    def thread_count(self):
        subject = self

        class _Threads:
            def __enter__(self):
                self.previous = torch.get_num_threads()
                torch.set_num_threads(subject.threads)

            def __exit__(self, *exc):
                torch.set_num_threads(self.previous)

        return _Threads()

    def time_once(self, n: int) -> None:
        with self.thread_count():
            self.walls[n].append(wall_ms(self.runner, n, self.role, 1, self.generator))

    def row(self, n: int, profiled: int) -> dict:
        runs = self.walls[n]
        wall = {"forward_ms": min(r["forward_ms"] for r in runs), "step_ms": min(r["step_ms"] for r in runs),
                "forward_median_ms": statistics.median(r["forward_ms"] for r in runs)}
        with self.thread_count():
            parts = breakdown(self.runner, self.model, n, self.role, profiled, self.generator)
        op_total = sum(parts.get(p, 0.0) for p in PARTS)
        reference = wall["step_ms"] if self.role == "draft" else wall["forward_ms"]
        print(f"  {self.key} n={n}: forward {wall['forward_ms']:.1f} ms, step {wall['step_ms']:.1f} ms, ops "
              f"{op_total:.1f} ms in {parts['ops']} ops", file=sys.stderr, flush=True)
        return {**{k: round(v, 3) for k, v in wall.items()}, "parts_ms": {p: parts.get(p, 0.0) for p in PARTS},
                "ops_ms": round(op_total, 3), "overhead_ms": round(reference - op_total, 3),
                "profiled_wall_ms": parts["profiled_wall"], "ops": parts["ops"]}


def measure(subjects: list[Subject], ns: list[int], repeats: int, profiled: int) -> None:
    """Wall times interleaved: each round times every subject once, so a busy moment of a shared machine hits them
    alike; the fastest per subject is kept. Then each subject's profiled breakdown."""
    for subject in subjects:
        for _ in range(2):
            subject.time_once(1)  # warm-up
        subject.walls.clear()
    for n in ns:
        for _ in range(repeats):
            for subject in subjects:
                if subject.role == "draft" or n == 1:
                    subject.time_once(n)
    for subject in subjects:
        subject.info["rows"] = {str(n): subject.row(n, profiled) for n in ns if subject.walls[n]}


def render(results: dict) -> str:
    lines = [f"# Draft forward cost breakdown ({results['env']['cpu']}, {results['env']['threads']} threads, "
             f"context {results['context']})", "",
             f"Measured {results['env']['when']}; load average before {results['env']['load_before']:.2f}, after "
             f"{results['env']['load_after']:.2f}. Wall = fastest of {results['repeats']} runs without the profiler "
             "(every model timed in turn in each round, so a busy moment hits all alike); parts = the fastest of "
             f"{results['profiled']} profiled runs (top-level op time charged to the model part it ran in); "
             "dispatch/Python = wall - sum of parts. Draft wall includes the engine's log-softmax + top-k over the "
             "vocabulary (`post`). Ratio = wall / the target's wall at n = 1.", ""]
    target_ms = next((m["rows"]["1"]["forward_ms"] for m in results["models"].values() if m["role"] == "target"),
                     None)
    header = "| model | n | wall ms | " + " | ".join(PARTS) + " | dispatch/Python | ops | vs target n=1 |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for key, entry in results["models"].items():
        for n, row in entry["rows"].items():
            wall = row["step_ms"] if entry["role"] == "draft" else row["forward_ms"]
            ratio = f"{wall / target_ms:.3f}" if target_ms else "-"
            cells = " | ".join(f"{row['parts_ms'][p]:.1f}" for p in PARTS)
            lines.append(f"| {key} | {n} | {wall:.1f} | {cells} | {row['overhead_ms']:.1f} | {row['ops']} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--target-dtype", default="int8", choices=["int8", "fp32", "none"],
                        help="none: skip the target")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--tokens", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profiled", type=int, default=3)
    parser.add_argument("--variants", default="base",
                        help="comma-separated draft variants: base, vocabN (reduced lm_head), fuse (fused "
                             "projections), lean (lean layers, fused), threadsN, or combinations joined by '+', "
                             "e.g. base,vocab32768,vocab65536+lean")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ns = [int(v) for v in args.tokens.split(",")]
    threads = torch.get_num_threads()
    results: dict = {"context": args.context, "repeats": args.repeats, "profiled": args.profiled, "models": {},
                     "env": {"cpu": cpu_description(), "threads": threads, "host": platform.node(),
                             "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "load_before": os.getloadavg()[0]}}
    subjects = []
    if args.target_dtype != "none":
        print(f"loading target {args.target} ({args.target_dtype})", file=sys.stderr, flush=True)
        target = load_target(args.target, args.target_dtype)
        info = results["models"][f"target-{args.target_dtype}"] = {"role": "target"}
        subjects.append(Subject(f"target-{args.target_dtype}", target, "target", args.context, threads, info))
    for variant in args.variants.split(","):
        opts = variant.split("+")
        vocab = next((int(o[5:]) for o in opts if o.startswith("vocab")), 0)
        fuse, lean = "fuse" in opts, "lean" in opts
        draft_threads = next((int(o[7:]) for o in opts if o.startswith("threads")), threads)
        print(f"loading draft {args.draft} variant {variant}", file=sys.stderr, flush=True)
        draft = load_draft(args.draft, vocab=vocab, fuse=fuse, lean=lean)
        info = results["models"][f"draft-{variant}"] = {"role": "draft", "vocab": vocab, "fuse": fuse or lean,
                                                        "lean": lean, "threads": draft_threads}
        subjects.append(Subject(f"draft-{variant}", draft, "draft", args.context, draft_threads, info))
    measure(subjects, ns, args.repeats, args.profiled)
    results["env"]["load_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
