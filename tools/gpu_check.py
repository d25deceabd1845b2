"""`make gpu-check`: on a CUDA machine, check exactness on the GPU and run a small benchmark; elsewhere, say so.

1. tests/test_exactness.py and tests/test_batch.py with the tiny models in float32 on cuda (CASTSPEC_TEST_DEVICE);
2. the real packaged pair in bfloat16 on cuda: eagle2 and cast give plain decoding's tokens on two prompts (the
   generators are built from `load_model(..., dtype=torch.bfloat16)` directly; `load_generator` loads float32);
3. `castspec bench` on 4 HumanEval prompts (ar, eagle2, cast; float32 as the CLI loads) into OUT/bench.
OUT/results.md collects the three. Exit status 0 when all passed or there is no GPU, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ['def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
           "def quicksort(arr: list[int]) -> list[int]:\n"]
BF16_POLICIES = ["eagle2", "cast"]


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Run a command from the repository root, output to `log`; (passed, its last output line)."""
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=handle,
                              stderr=subprocess.STDOUT, text=True)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return done.returncode == 0, lines[-1] if lines else ""


def first_difference(target, prompt_ids: list[int], expected: list[int], got: list[int]) -> str:
    """Where two greedy outputs part, and the target's logit gap there: a gap within bfloat16 rounding is a tie."""
    i = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got)))
    if i == len(expected) == len(got):
        return ""
    if i >= min(len(expected), len(got)):
        return f"lengths differ ({len(got)} vs {len(expected)} tokens)"
    with torch.no_grad():
        ids = torch.tensor([prompt_ids + expected[:i]], device=target.device)
        logits = target(ids).logits[0, -1].float()
    gap = float(logits[expected[i]] - logits[got[i]])
    tie = abs(gap) <= abs(float(logits[expected[i]])) * 2**-7  # within about one bfloat16 rounding step
    return f"token {i}: logit gap {gap:.4f}" + (" (a bfloat16 tie)" if tie else "")


def real_pair_bf16(max_new_tokens: int = 48, device: str = "cuda") -> tuple[bool, list[str]]:
    """Markdown rows: each prompt x policy, identical to plain decoding in bfloat16 or where it is not."""
    from castspec.api import DEFAULT_DRAFT, DEFAULT_TARGET
    from castspec.cost.profiler import load_or_profile
    from castspec.cost.table import OnlineCosts
    from castspec.engine import SpeculativeGenerator
    from castspec.models.load import load_model

    target, tokenizer = load_model(DEFAULT_TARGET, device=device, dtype=torch.bfloat16)
    draft, _ = load_model(DEFAULT_DRAFT, device=device, dtype=torch.bfloat16)
    costs = OnlineCosts(load_or_profile({"target": target, "draft": draft}))
    plain = SpeculativeGenerator(target, tokenizer, policy="ar")
    ok, rows = True, ["| prompt | policy | tokens | identical to plain | first difference |", "|---|---|---|---|---|"]
    for n, prompt in enumerate(PROMPTS, start=1):
        expected = plain.generate(prompt, max_new_tokens=max_new_tokens).token_ids
        for policy in BF16_POLICIES:
            gen = SpeculativeGenerator(target, tokenizer, draft=draft, policy=policy, costs=costs)
            got = gen.generate(prompt, max_new_tokens=max_new_tokens).token_ids
            ok &= got == expected
            where = first_difference(target, gen.encode(prompt), expected, got)
            rows.append(f"| {n} | {policy} | {len(got)} | {'yes' if got == expected else 'NO'} | {where} |")
    return ok, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}); nothing to check.")
        return 0
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = [f"# gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", ""]

    print("gpu-check: 1/3 exactness tests on cuda (tiny models, float32)", flush=True)
    tests_ok, summary = run_logged([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    "tests/test_exactness.py", "tests/test_batch.py"], out / "pytest.log",
                                   env={"CASTSPEC_TEST_DEVICE": "cuda", "HF_HUB_OFFLINE": "1"})
    report += ["## 1. Exactness tests on cuda (tiny models, float32)", "",
               f"{'passed' if tests_ok else 'FAILED'}: `{summary}` (log: pytest.log)", ""]

    print("gpu-check: 2/3 real pair in bfloat16 vs plain decoding", flush=True)
    try:
        pair_ok, rows = real_pair_bf16()
    except Exception as err:  # reported in results.md; the other parts still run
        pair_ok, rows = False, [f"FAILED: {type(err).__name__}: {err}"]
    report += ["## 2. Real pair in bfloat16 on cuda: speculative output vs plain decoding", "", *rows, ""]
    torch.cuda.empty_cache()

    print("gpu-check: 3/3 castspec bench, 4 HumanEval prompts (ar, eagle2, cast)", flush=True)
    bench_ok, summary = run_logged([sys.executable, "-m", "castspec", "bench", "--dataset", "humaneval",
                                    "--num-prompts", "4", "--max-new-tokens", "128", "--methods", "ar,eagle2,cast",
                                    "--device", "cuda", "--out", str(out / "bench")], out / "bench.log")
    bench_md = out / "bench" / "results.md"
    report += ["## 3. HumanEval, 4 prompts, float32 on cuda (`castspec bench`)", ""]
    report += [bench_md.read_text()] if bench_ok and bench_md.is_file() else [f"FAILED: `{summary}` (log: bench.log)"]

    (out / "results.md").write_text("\n".join(report) + "\n")
    passed = tests_ok and pair_ok and bench_ok
    print(f"gpu-check: {'all passed' if passed else 'FAILURES'}; see {out / 'results.md'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
