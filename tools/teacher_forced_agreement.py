"""Teacher-forced greedy agreement of a target format with a reference run (e.g. fp32): per token, does the format
pick the same greedy token as the reference did, given the reference's own context?

    python tools/teacher_forced_agreement.py REFERENCE_DIR --target-dtype q4k [--method ar] [--out FILE.md]

REFERENCE_DIR is a `castspec bench` run (its `ar` outputs are the reference's greedy tokens). Each prompt's first
turn plus the reference's answer runs through the candidate format in one forward; agreement = positions where the
candidate's argmax equals the reference's next token / all positions. Unlike free-running agreement
(`tools/format_agreement.py`), one early near-tie does not turn the rest of an answer into a mismatch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from format_agreement import outputs, report  # noqa: E402

from castspec.api import load_generator  # noqa: E402
from castspec.bench.datasets import load_prompts  # noqa: E402
from castspec.bench.runner import encode_prompt  # noqa: E402
from castspec.errors import CastspecError  # noqa: E402


@torch.inference_mode()
def agreement(runner, prompt_ids: list[int], answer: list[int]) -> int:
    """How many of `answer`'s tokens are the candidate's greedy choice after the prompt and the answer before it."""
    first = runner.prefill([prompt_ids], budget=len(answer))
    runner.begin_block()
    n = len(answer) - 1
    if n > 0:
        rest = runner.forward(torch.tensor([answer[:-1]]), runner.next_pos[:, None] + torch.arange(n),
                              torch.ones(n, n, dtype=torch.bool).tril()[None])[0]
        picks = torch.cat([first.argmax(-1), rest.argmax(-1)])
    else:
        picks = first.argmax(-1)
    return int((picks == torch.tensor(answer)).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("--target-dtype", required=True)
    parser.add_argument("--method", default="ar")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        config, reference = outputs(args.reference, args.method, first_turn=True)
        prompts = {p.id: p for dataset in config["datasets"]
                   for p in load_prompts(dataset, config["num_prompts"], config.get("seed", 0))}
        gen = load_generator(config["target"], draft="none", policy="ar", target_dtype=args.target_dtype)
    except (OSError, KeyError, CastspecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for prompt_id in sorted(reference):
        answer = reference[prompt_id]
        agreed = agreement(gen.runtimes["target"].runner, encode_prompt(gen.tokenizer, prompts[prompt_id]), answer)
        rows.append((prompt_id, len(answer), agreed))
        print(f"{prompt_id}: {agreed}/{len(answer)}", file=sys.stderr)
    total, agreed = sum(r[1] for r in rows), sum(r[2] for r in rows)
    reference_dtype = config.get("target_dtype", "fp32")
    summary = (f"Teacher-forced greedy agreement of `{args.target_dtype}` with `{reference_dtype}` "
               f"(`{args.reference}`, {args.method}, first turns of {len(rows)} prompts): **{agreed / total:.4f}** "
               f"({agreed} of {total} tokens).")
    report(summary, ["prompt", "tokens", "same greedy token"], [list(row) for row in rows], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
