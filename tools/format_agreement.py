"""Greedy agreement of a target format with the fp32 target: compare `ar` outputs of two `castspec bench` runs.

    python tools/format_agreement.py REFERENCE_DIR CANDIDATE_DIR [--method ar] [--out FILE.md]

Both directories must hold runs over the same prompts and token budget (e.g. `--target-dtype fp32` and
`--target-dtype int8`). For each prompt: the length of the common prefix of the two outputs (free-running greedy:
after the first differing token the contexts differ, so later tokens are not comparable) and whether the outputs
are identical. Agreement = common-prefix tokens / reference tokens, summed over prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def outputs(run_dir: Path, method: str, first_turn: bool = False) -> tuple[dict, dict[str, list[int]]]:
    """The run's config and {prompt id: token ids} of `method` (`first_turn`: only the first turn's tokens)."""
    lines = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines() if line.strip()]
    config = next((x["config"] for x in lines if "config" in x), {})
    found = {}
    for line in lines:
        group = line.get("group")
        if not group or method not in group["methods"]:
            continue
        result = group["methods"][method]
        for prompt, ids, turns in zip(group["prompts"], result["token_ids"], result["turn_tokens"], strict=True):
            found[prompt] = ids[: turns[0]] if first_turn else ids
    return config, found


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(reference: dict[str, list[int]], candidate: dict[str, list[int]]) -> dict:
    rows = []
    for prompt in sorted(set(reference) & set(candidate), key=lambda p: (p.split("/")[0], p)):
        ref, cand = reference[prompt], candidate[prompt]
        rows.append({"prompt": prompt, "tokens": len(ref), "common_prefix": common_prefix(ref, cand),
                     "identical": ref == cand})
    total = sum(r["tokens"] for r in rows)
    agreed = sum(r["common_prefix"] for r in rows)
    return {"prompts": len(rows), "identical": sum(r["identical"] for r in rows),
            "agreement": agreed / total if total else None, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--method", default="ar")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        ref_config, reference = outputs(args.reference, args.method)
        cand_config, candidate = outputs(args.candidate, args.method)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read the runs: {e}", file=sys.stderr)
        return 2
    result = compare(reference, candidate)
    if not result["prompts"]:
        print(f"error: no prompt has `{args.method}` output in both runs", file=sys.stderr)
        return 2
    formats = (ref_config.get("target_dtype", "fp32"), cand_config.get("target_dtype", "fp32"))
    summary = (f"Greedy agreement of `{formats[1]}` with `{formats[0]}` ({args.method} outputs, "
               f"{result['prompts']} prompts): **{result['agreement']:.3f}** of tokens before the first difference; "
               f"{result['identical']} outputs identical.")
    report(summary, ["prompt", "tokens", "common prefix", "identical"],
           [[r["prompt"], r["tokens"], r["common_prefix"], "yes" if r["identical"] else "no"] for r in result["rows"]],
           args.out)
    return 0


def report(summary: str, columns: list[str], rows: list[list], out: Path | None) -> None:
    """Print the summary line and a markdown table of the rows; write the same text to `out` if given."""
    lines = [summary, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
