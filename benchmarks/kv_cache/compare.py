"""Before/after for the in-place KV cache: decode time of this checkout against an earlier commit's copying cache.

Both versions run in one process on the *same* loaded models (same kernels, same cost table), on the same prompts,
interleaved per prompt and method, so the only difference is the engine/runner/draft code. The earlier commit's
`castspec` package is exported with `git archive` and imported under the name `castspec_before`.

    python benchmarks/kv_cache/compare.py --before 1d23e00 \
        --dataset spec-bench:../shared/data/spec_bench/question.jsonl:rag,cnn-dm --num-prompts 4 \
        --methods ar,cast --out benchmarks/kv_cache
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from castspec.api import load_generator
from castspec.bench.datasets import load_prompts
from castspec.cost.profiler import cpu_description
from castspec.cost.table import OnlineCosts
from castspec.engine import SpeculativeGenerator
from castspec.policies import make_policy


def import_before(commit: str, where: Path):
    """Export `castspec/` at `commit` as package `castspec_before` and import its engine and policies."""
    archive = subprocess.run(["git", "archive", commit, "castspec"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    package = where / "castspec_before"
    (where / "castspec").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(text.replace("from castspec", "from castspec_before").replace("import castspec",
                                                                                        "import castspec_before"))
    sys.path.insert(0, str(where))
    return importlib.import_module("castspec_before.engine"), importlib.import_module("castspec_before.policies")


def encode(tokenizer, prompt) -> list[int]:
    if not prompt.chat:
        return list(tokenizer(prompt.turns[0])["input_ids"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.turns[0]}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def measure(gen, ids: list[int], max_new_tokens: int) -> dict:
    result = gen.generate(ids, max_new_tokens=max_new_tokens)
    s = result.stats
    return {"tokens": result.token_ids, "new_tokens": len(result.token_ids), "steps": s.steps,
            "prefill_s": s.prefill_s, "draft_s": s.draft_s, "verify_s": s.verify_s, "wall_s": s.wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="commit whose engine is the 'before'")
    parser.add_argument("--dataset", action="append", required=True)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--methods", default="ar,cast")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        old_engine, old_policies = import_before(args.before, Path(tmp))
        base = load_generator(policy="cast")
        target, draft = base.runtimes["target"].model, base.runtimes["draft"].model  # the generator's public runtimes
        tokenizer, table = base.tokenizer, base.costs.table
        versions = {}
        for method in methods:
            versions[("before", method)] = old_engine.SpeculativeGenerator(
                target, tokenizer, draft, old_policies.make_policy(method), costs=OnlineCosts(table))
            versions[("after", method)] = SpeculativeGenerator(target, tokenizer, draft, make_policy(method),
                                                               costs=OnlineCosts(table))
        prompts = [p for d in args.dataset for p in load_prompts(d, args.num_prompts)]
        warm = encode(tokenizer, prompts[0])
        for gen in versions.values():
            gen.generate(warm, max_new_tokens=4)
        records = run_interleaved(versions, prompts, tokenizer, args.max_new_tokens)
    write(args, records)


def run_interleaved(versions: dict, prompts: list, tokenizer, max_new_tokens: int) -> list[dict]:
    """Every method, before and after, on each prompt before the next prompt; the order alternates per prompt."""
    records = []
    for number, prompt in enumerate(prompts):
        ids = encode(tokenizer, prompt)
        order = sorted(versions, reverse=number % 2 == 1)
        for key in order:
            rec = measure(versions[key], ids, max_new_tokens)
            rec.update(prompt=prompt.id, task=prompt.task, prompt_tokens=len(ids), version=key[0], method=key[1])
            records.append(rec)
            print(f"{prompt.id} {key[1]:>6} {key[0]:>6}: decode {rec['draft_s'] + rec['verify_s']:.2f} s, "
                  f"prefill {rec['prefill_s']:.2f} s, {rec['new_tokens']} tokens", file=sys.stderr, flush=True)
    return records


def write(args, records: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    rows, identical = [], True
    tasks = sorted({r["task"] for r in records})
    for task in tasks:
        for method in args.methods.split(","):
            sel = {v: [r for r in records if r["task"] == task and r["method"] == method and r["version"] == v]
                   for v in ("before", "after")}
            decode = {v: sum(r["draft_s"] + r["verify_s"] for r in sel[v]) for v in sel}
            wall = {v: sum(r["wall_s"] for r in sel[v]) for v in sel}
            same = all(a["tokens"] == b["tokens"] for a, b in zip(sel["before"], sel["after"], strict=True))
            identical &= same
            rows.append({"task": task, "method": method, "prompts": len(sel["after"]),
                         "prompt_tokens": sum(r["prompt_tokens"] for r in sel["after"]),
                         "new_tokens": sum(r["new_tokens"] for r in sel["after"]),
                         "decode_s_before": round(decode["before"], 2), "decode_s_after": round(decode["after"], 2),
                         "decode_speedup": round(decode["before"] / decode["after"], 3),
                         "wall_s_before": round(wall["before"], 2), "wall_s_after": round(wall["after"], 2),
                         "identical_outputs": same})
    env = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "before": args.before, "command": " ".join(sys.argv), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (args.out / "results.json").write_text(json.dumps({"env": env, "summary": rows, "records": records}, indent=1))
    lines = [f"# KV cache before/after ({env['cpu']}, {env['threads']} threads, torch {env['torch']})", "",
             f"`{env['command']}`", "",
             "| task | method | prompts | prompt tokens | new tokens | decode s before | decode s after | "
             "decode speedup | wall s before | wall s after | identical |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['prompts']} | {r['prompt_tokens']} | {r['new_tokens']} | "
                     f"{r['decode_s_before']} | {r['decode_s_after']} | {r['decode_speedup']}x | "
                     f"{r['wall_s_before']} | {r['wall_s_after']} | {r['identical_outputs']} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
