"""How much of a decoding step is castspec's own Python, not model forwards (issue 14: keep it below 10%).

    .venv/bin/python benchmarks/step_overhead/profile_step.py --target-dtype int8 --out benchmarks/step_overhead/int8

Loads the real pair as `castspec generate` does (`load_generator`), warms up, then decodes HumanEval prompts with
each policy and splits every step's wall time (from the start of drafting to the end of the commit, plus the
per-step bookkeeping around it: the decode phase's wall time, prefill excluded) into:

* target model: time inside the target's Hugging Face forward (a forward pre/post hook pair);
* draft model: the same for the draft;
* runner: the rest of `CausalLMRunner.forward` (mask building, cache bookkeeping, the layout for canonical attention);
* engine: everything else (tree building, top-k, policy decisions, verification, commits, stats).

"overhead" = runner + engine as a share of the step. Writes results.json and results.md into `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from castspec.api import load_generator  # noqa: E402
from castspec.bench.datasets import load_prompts  # noqa: E402
from castspec.cost.profiler import cpu_description  # noqa: E402


class Clock:
    """Accumulates time spent inside one model's forwards and inside one runner's `forward`/`forward_greedy`."""

    def __init__(self, runner) -> None:
        self.model_s = self.runner_s = 0.0
        self._start, self._depth = 0.0, 0
        runner.model.register_forward_pre_hook(self._enter)
        runner.model.register_forward_hook(self._leave)
        if runner.native is not None:  # a native stack runs the model without its module call: time that instead
            stack_forward = runner.native.forward

            def stack_timed(*args, **kwargs):
                self._enter()
                try:
                    return stack_forward(*args, **kwargs)
                finally:
                    self._leave()

            runner.native.forward = stack_timed
        # instance attributes: this script's generator only. Greedy verification enters through forward_greedy.
        runner.forward = self._timed(runner.forward)
        runner.forward_greedy = self._timed(runner.forward_greedy)

    def _timed(self, inner):
        def timed(*args, **kwargs):  # counted once when one calls the other (forward_greedy without a greedy head)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth -= 1
                if not self._depth:
                    self.runner_s += time.perf_counter() - t0

        return timed

    def _enter(self, *args) -> None:
        self._start = time.perf_counter()

    def _leave(self, *args) -> None:
        self.model_s += time.perf_counter() - self._start

    def reset(self) -> None:
        self.model_s = self.runner_s = 0.0


def measure(gen, clocks: dict[str, Clock], prompts: list[str], max_new_tokens: int) -> dict[str, float]:
    """Decode every prompt; the decode phase's time split into model forwards, runner and engine, per step."""
    steps = 0
    decode_s = 0.0
    totals = {name: [0.0, 0.0] for name in clocks}
    for prompt in prompts:
        seen = []

        def after_prefill(tokens: list[int], seen: list[int] = seen) -> None:
            if not seen:  # the first token comes right after the prefill: its forwards are not decode time
                for clock in clocks.values():
                    clock.reset()
            seen.append(len(tokens))

        result = gen.generate(prompt, max_new_tokens=max_new_tokens, on_tokens=after_prefill)
        stats = result.stats
        steps += stats.steps
        decode_s += stats.wall_s - stats.prefill_s
        for name, clock in clocks.items():
            totals[name][0] += clock.model_s
            totals[name][1] += clock.runner_s
    out = {"steps": steps, "step_ms": 1000 * decode_s / steps}
    accounted = 0.0
    for name, (model_s, runner_s) in totals.items():
        out[f"{name}_model_ms"] = 1000 * model_s / steps
        out[f"{name}_runner_ms"] = 1000 * (runner_s - model_s) / steps
        accounted += runner_s
    out["engine_ms"] = out["step_ms"] - 1000 * accounted / steps
    out["overhead_share"] = (out["engine_ms"] + sum(out[f"{n}_runner_ms"] for n in totals)) / out["step_ms"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-dtype", default="int8", choices=["fp32", "int8", "q4k"])
    parser.add_argument("--policies", default="ar,cast")
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--lazy-draft", action=argparse.BooleanOptionalAction, default=False,
                        help="buy the draft model lazily, as `castspec generate` does by default; off here because "
                             "a lazy purchase runs the draft's prefill inside the decode phase, which this split "
                             "would count as draft-model time per step")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    prompts = [p.turns[0] for p in load_prompts("humaneval", args.num_prompts, seed=0)]
    rows = {}
    for policy in args.policies.split(","):
        gen = load_generator(policy=policy, target_dtype=args.target_dtype, lazy_draft=args.lazy_draft)
        clocks = {"target": Clock(gen.runtimes["target"].runner)}
        if "draft" in gen.runtimes:
            clocks["draft"] = Clock(gen.runtimes["draft"].runner)
        gen.generate(prompts[0], max_new_tokens=8)  # warm-up
        rows[policy] = measure(gen, clocks, prompts, args.max_new_tokens)
        print(policy, json.dumps(rows[policy]), flush=True)
        del gen
    env = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "target_dtype": args.target_dtype, "lazy_draft": args.lazy_draft, "prompts": args.num_prompts,
           "max_new_tokens": args.max_new_tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"env": env, "policies": rows}, indent=2))
    lines = [f"# Per-step time split, target {args.target_dtype} ({env['cpu']}, {env['threads']} threads)", "",
             "| policy | steps | step ms | target model | draft model | runner | engine | overhead share |",
             "|---|---|---|---|---|---|---|---|"]
    for policy, r in rows.items():
        runner = r.get("target_runner_ms", 0) + r.get("draft_runner_ms", 0)
        lines.append(f"| {policy} | {r['steps']} | {r['step_ms']:.1f} | {r['target_model_ms']:.1f} | "
                     f"{r.get('draft_model_ms', 0):.1f} | {runner:.1f} | {r['engine_ms']:.1f} | "
                     f"{100 * r['overhead_share']:.1f}% |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
