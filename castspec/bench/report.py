"""Write a benchmark's results: results.json, a readable results.md table, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(results: dict[str, Any], out_dir: Path, command: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "command": command}
    paths = [out_dir / "results.json", out_dir / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1))
    paths[1].write_text(markdown_table(results))
    paths += _plots(results, out_dir)
    return paths


def markdown_table(results: dict[str, Any]) -> str:
    summary, env, config = results["summary"], results["environment"], results["config"]
    mode = "greedy" if not config.get("temperature") else (
        f"sampling T={config['temperature']}, top-k {config.get('top_k') or 'off'}, top-p {config.get('top_p')}")
    lines = [f"# castspec bench: {len(results['prompts'])} prompts, {config['max_new_tokens']} new tokens, {mode}", "",
             f"Command: `{results.get('command', '')}`", "",
             f"Environment: {env['cpu']}, {env['threads']} threads, torch {env['torch']}, "
             f"transformers {env['transformers']}; target kernels {env['target_kernels']}"
             + (f", draft kernels {env['draft_kernels']}" if "draft_kernels" in env else "") + f"; {env['date']}", "",
             "| method | tokens/s | speedup vs ar | speedup vs hf | tokens/step | identical to ar | failed |",
             "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| `{method}` | {s['tokens_per_s']:.3f} | {_x(s.get('speedup_vs_ar'))} | "
                     f"{_x(s.get('speedup_vs_hf'))} | {s.get('mean_accept_len', 1.0):.2f} | "
                     f"{_pct(s.get('identical_to_ar'))} | {len(s['failed'])} |")
    diverged = [(m, d) for m, s in summary.items() for d in s.get("divergences", [])]
    if diverged:
        lines += ["", "Outputs that differ from `ar` (first differing token; logit gap = target's logit of ar's token "
                  "minus that of the other method's token, measured by a plain forward):", ""]
        lines += [f"- `{m}` on {d['prompt']}: token {d['index']}, gap {d['logit_gap']}" for m, d in diverged]
    return "\n".join(lines) + "\n"


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "–"


def _pct(value: float | None) -> str:
    return f"{100 * value:.0f}%" if value is not None else "–"


def _plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    methods = list(summary)
    paths = []
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods)), 4))
    values = [summary[m].get("speedup_vs_ar", 0.0) for m in methods]
    ax.bar(range(len(methods)), values, color=["#888" if m in ("ar", "hf") else "#2a7" for m in methods])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs ar (tokens/s ratio)")
    ax.set_title("castspec bench: " + ", ".join(sorted({r['task'] for r in results['prompts']})))
    fig.tight_layout()
    paths.append(out_dir / "speedup.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    spec = [m for m in methods if "accept_len_histogram" in summary[m] and m != "ar"]
    if spec:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(spec)
        for i, m in enumerate(spec):
            hist = {int(k): v for k, v in summary[m]["accept_len_histogram"].items()}
            total = sum(hist.values())
            xs = sorted(hist)
            ax.bar([x + i * width for x in xs], [hist[x] / total for x in xs], width=width, label=m)
        ax.set_xlabel("draft tokens accepted per step")
        ax.set_ylabel("fraction of steps")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / "accept_hist.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
