"""Write a benchmark's results: results.json, a readable results.md, and PNG plots."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from castspec.bench.llamacpp import DIFFERENT_ARITHMETIC, DRAFT_MODEL_TYPE, PLAIN, is_llamacpp_method

BASELINES = ("ar", "hf", "hf-assisted", "hf-pld", "llama.cpp")


def write_report(results: dict[str, Any], out_dir: Path, command: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "command": command}
    paths = [out_dir / "results.json", out_dir / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1))
    paths[1].write_text(markdown_report(results))
    paths += _plots(results, out_dir)
    return paths


def markdown_report(results: dict[str, Any]) -> str:
    env, config = results["environment"], results["config"]
    mode = "greedy" if not config.get("temperature") else (
        f"sampling T={config['temperature']}, top-k {config.get('top_k') or 'off'}, top-p {config.get('top_p')}")
    by_batch = results["by_batch_size"]
    prompts = sorted({p for r in results["records"] for p in r["prompts"]})
    lines = [f"# castspec bench: {len(prompts)} prompts, {config['max_new_tokens']} new tokens, {mode}", ""]
    if not results.get("complete", True):
        lines += [f"**Partial results**: {results['groups_done']} of {results['groups_planned']} prompt groups "
                  "measured so far (resume with `--resume`).", ""]
    lines += [f"Command: `{results.get('command', '')}`", "",
              f"Environment: {env['cpu']}, {env['threads']} threads, torch {env['torch']}, "
              f"transformers {env['transformers']}; target kernels {env['target_kernels']}"
              + (f", draft kernels {env['draft_kernels']}" if "draft_kernels" in env else "")
              + f"; commit {env.get('commit')}; {env['date']}"
              + (f"; load average at start {' / '.join(str(x) for x in env['load_avg'])} (1/5/15 min) on "
                 f"{env.get('cores')} cores" if env.get("load_avg") else ""), ""]
    if len(results.get("sessions", [])) > 1:
        lines += _sessions_table(results) + [""]
    if len(by_batch) > 1:
        lines += _batch_table(by_batch) + [""]
    for batch, part in by_batch.items():
        if len(by_batch) > 1:
            lines += [f"## Batch size {batch}", ""]
        lines += _method_table(part["summary"]) + [""]
        lines += _llamacpp_note(part["summary"], env,
                                [r for r in results["records"] if str(r["batch_size"]) == str(batch)])
        if len(part["by_task"]) > 1:
            lines += _task_table(part["by_task"]) + _decode_table(part["by_task"]) + [""]
        lines += _divergences(part["summary"])
    return "\n".join(lines).rstrip() + "\n"


def _sessions_table(results: dict[str, Any]) -> list[str]:
    """Which session (and so which host) measured which groups: a resumed run may span machines.

    Every method of a group is measured in the same session, so ratios within a task stay like-for-like; absolute
    tokens/s of tasks measured on different hosts are not comparable.
    """
    lines = [f"Measured in {len(results['sessions'])} sessions (resumed with `--resume`):", "",
             "| session | started | CPU | commit | groups measured |", "|---|---|---|---|---|"]
    counts = Counter((record.get("session"), record["task"]) for record in results["records"])
    for index, session in enumerate(results["sessions"]):
        env = session.get("environment") or {}
        measured = ", ".join(f"{task} {n}" for (at, task), n in counts.items() if at == index) or "none"
        lines.append(f"| {index + 1} | {session.get('started')} | {env.get('cpu', '?')} | {env.get('commit', '?')} | "
                     f"{measured} |")
    cpus = {(s.get("environment") or {}).get("cpu") for s in results["sessions"]}
    if len(cpus) > 1:
        lines += ["", "The sessions ran on different CPUs: compare speedups within a task (every method of a group "
                  "ran in the same session), not tokens/s across tasks."]
    return lines


def _method_table(summary: dict[str, Any]) -> list[str]:
    """One row per method; 'decode only' leaves out prefill, which no speculative method shortens."""
    lines = ["| method | tokens/s | speedup vs ar | speedup vs hf | decode only: vs ar | prefill share | tokens/step | "
             "verified nodes/step | identical to ar | peak RSS (allocated) | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| `{method}` | {s['tokens_per_s']:.3f} | {_x(s.get('speedup_vs_ar'))} | "
                     f"{_x(s.get('speedup_vs_hf'))} | {_x(s.get('decode_speedup_vs_ar'))} | "
                     f"{_pct(s.get('outside_decode_share'))} | {_num(s.get('mean_accept_len'), 2)} | "
                     f"{_num(s.get('mean_verified_nodes'))} | {_pct(s.get('identical_to_ar'))} | "
                     f"{_gb(s.get('peak_rss_mb'))} ({_gb(s.get('peak_anon_mb'))}) | {len(s['failed'])} |")
    return lines


def _busy(records: list[dict[str, Any]]) -> str:
    """How busy the rest of the machine was just before each run: llama.cpp's spinning threads make it sensitive."""
    busy = [b for rec in records for b in rec.get("busy_cores") or [] if b is not None]
    text = ("llama.cpp with as many threads as cores stalls when another process shares the cores"
            + (f"; other processes kept {sum(busy) / len(busy):.2f} cores busy on average just before its runs "
               f"(at most {max(busy):.2f})" if busy else "") + ".")
    return text


def _llamacpp_note(summary: dict[str, Any], env: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """What the llama.cpp rows are, with their decode-only speed beside the end-to-end one."""
    lines = []
    records_of = {method: [r["methods"][method] for r in records if method in r["methods"]] for method in summary}
    info = env.get("llamacpp") or {}
    for method, s in summary.items():
        if not is_llamacpp_method(method) or not s.get("tokens_per_s"):
            continue
        if method != PLAIN:
            spec = (env.get("llamacpp_spec") or {}).get(method) or {}
            kind = spec.get("spec_type", DRAFT_MODEL_TYPE)
            key = f", key of {spec['ngram_key']} tokens" if spec.get("ngram_key") else ""
            free = f"no draft model: --spec-type {kind}, candidates from the text itself{key}"
            source = f"draft {Path((spec.get('draft_gguf') or {}).get('path', '?')).name}" \
                if kind == DRAFT_MODEL_TYPE else free
            lines.append(
                f"`{method}`: llama.cpp's own speculative decoding ({Path(spec.get('binary', '?')).name}, "
                f"{spec.get('version', '?')}; {source}, up to {spec.get('spec_draft_n_max', '?')} draft tokens "
                f"per step, greedy, {spec.get('threads', '?')} threads), one process per prompt, its own timers "
                f"(model loading left out): {s['tokens_per_s']:.2f} tokens/s end to end, "
                f"{_num(s.get('decode_tokens_per_s'), 2)} tokens/s decode only, "
                f"{_num(s.get('mean_accept_len'), 2)} tokens per target step; identical to `ar` on "
                f"{_pct(s.get('identical_to_ar'))} of the prompts (its output ids are its printed text tokenized "
                f"again). " + DIFFERENT_ARITHMETIC + ". " + _busy(records_of.get(method, [])))
            continue
        gguf = info.get("gguf") or {}
        lines.append(
            f"`{method}`: plain greedy decoding of {Path(gguf.get('path', '?')).name} ({gguf.get('source', '?')}) "
            f"by llama.cpp (llama-cpp-python {info.get('llama_cpp_python', '?')}, {info.get('threads', '?')} "
            f"threads, same prompt token ids, budget and EOS ids): {s['tokens_per_s']:.2f} tokens/s end to end, "
            f"{_num(s.get('decode_tokens_per_s'), 2)} tokens/s decode only (prefill {_num(s.get('prefill_s'), 2)} s "
            f"of {s['wall_s']:.2f} s), 1 token per step; identical to `ar` on {_pct(s.get('identical_to_ar'))} of "
            f"the prompts; " + DIFFERENT_ARITHMETIC + ". " + _busy(records_of.get(method, [])))
    return [line for paragraph in lines for line in (paragraph, "")]


def _task_table(by_task: dict[str, Any]) -> list[str]:
    """Methods x tasks: tokens/s and speedup over `ar` in that task; the fastest method per task in bold."""
    tasks = list(by_task)
    methods = list(dict.fromkeys(m for t in tasks for m in by_task[t]))
    best = {t: max(by_task[t], key=lambda m: by_task[t][m]["tokens_per_s"]) for t in tasks}
    lines = ["Per task: tokens/s (speedup vs `ar` in that task); fastest in bold.", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for method in methods:
        cells = []
        for task in tasks:
            s = by_task[task].get(method)
            cell = "–" if s is None else f"{s['tokens_per_s']:.2f} ({_x(s.get('speedup_vs_ar'))})"
            cells.append(f"**{cell}**" if best[task] == method else cell)
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return lines


def _decode_table(by_task: dict[str, Any]) -> list[str]:
    """Methods x tasks, decode phase only: prefill, which no speculative method shortens, caps the end-to-end
    speedup on long prompts, so this shows what speculation does where it can act."""
    tasks = list(by_task)
    ar = {t: by_task[t].get("ar", {}) for t in tasks}
    if not all(a.get("decode_tokens_per_s") for a in ar.values()):
        return []
    lines = ["", "Decode phase only (prefill left out: no speculative method shortens it): speedup vs `ar`; "
             "the last row is the share of `ar`'s time spent outside decode steps.", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for method in dict.fromkeys(m for t in tasks for m in by_task[t]):
        if any(by_task[t].get(method, {}).get("decode_speedup_vs_ar") for t in tasks):
            lines.append(f"| `{method}` | " + " | ".join(
                _x(by_task[t].get(method, {}).get("decode_speedup_vs_ar")) for t in tasks) + " |")
    lines.append("| prefill share of `ar` | " + " | ".join(_pct(ar[t]["outside_decode_share"]) for t in tasks)
                 + " |")
    return lines


def _batch_table(by_batch: dict[str, Any]) -> list[str]:
    """Methods x batch sizes: batch throughput, speedup over batched `ar`, and the verified tree per sequence."""
    sizes = list(by_batch)
    methods = list(dict.fromkeys(m for b in sizes for m in by_batch[b]["summary"]))
    lines = ["Throughput of the whole batch, tokens/s (speedup vs batched `ar`) [verified nodes per sequence per "
             "step, mean depth]:", "", "| method | " + " | ".join(f"B={b}" for b in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for method in methods:
        cells = []
        for batch in sizes:
            s = by_batch[batch]["summary"].get(method)
            if s is None:
                cells.append("–")
                continue
            tree = f" [{s['mean_verified_nodes']:.1f}, {s['mean_depth']:.1f}]" if s.get("mean_verified_nodes") else ""
            cells.append(f"{s['tokens_per_s']:.2f} ({_x(s.get('speedup_vs_ar'))}){tree}")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    peaks = {b: [max((s.get(key) or 0) for s in by_batch[b]["summary"].values())
                 for key in ("peak_rss_mb", "peak_anon_mb")] for b in sizes}
    lines += ["", "Peak resident memory of the process per batch size (in brackets: allocated by the process, i.e. "
              "without the model files mapped from disk): " + ", ".join(f"B={b} {_gb(p)} ({_gb(a)})"
                                                                         for b, (p, a) in peaks.items())]
    return lines


def _divergences(summary: dict[str, Any]) -> list[str]:
    diverged = [(m, d) for m, s in summary.items() for d in s.get("divergences", [])]
    if not diverged:
        return []
    lines = ["Outputs that differ from `ar` (first differing token; logit gap = target's logit of ar's token minus "
             "that of the other method's token, measured by a plain forward):", ""]
    lines += [f"- `{m}` on {d['prompt']}: token {d.get('index')}, gap {d.get('logit_gap')}"
              + (" (expected for llama.cpp: different arithmetic, not an exactness failure)"
                 if is_llamacpp_method(m) else "") for m, d in diverged]
    return lines + [""]


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "–"


def _pct(value: float | None) -> str:
    return f"{100 * value:.0f}%" if value is not None else "–"


def _num(value: float | None, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value is not None else "–"


def _gb(mb: float | None) -> str:
    return f"{mb / 1024:.1f} GB" if mb else "–"


def _plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_batch = results["by_batch_size"]
    if not by_batch:
        return []
    first = next(iter(by_batch.values()))
    summary = first["summary"]
    methods = list(summary)
    color = ["#888" if m in BASELINES or is_llamacpp_method(m) else "#2a7" for m in methods]
    paths = []

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods)), 4))
    ax.bar(range(len(methods)), [summary[m].get("speedup_vs_ar", 0.0) for m in methods], color=color)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs ar (tokens/s ratio)")
    ax.set_title("castspec bench: " + ", ".join(first["by_task"]))
    paths.append(_save(fig, out_dir / "speedup.png"))

    tasks = list(first["by_task"])
    if len(tasks) > 1:
        fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(tasks) * max(1, len(methods) / 5)), 4.5))
        width = 0.85 / len(methods)
        for i, method in enumerate(methods):
            values = [first["by_task"][t].get(method, {}).get("speedup_vs_ar", 0.0) for t in tasks]
            ax.bar([x + i * width for x in range(len(tasks))], values, width=width, label=method)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([x + 0.425 - width / 2 for x in range(len(tasks))], tasks)
        ax.set_ylabel("speedup vs ar in the task")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("speedup per method per task")
        paths.append(_save(fig, out_dir / "speedup_by_task.png"))

    if len(by_batch) > 1:
        sizes = [int(b) for b in by_batch]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for method in dict.fromkeys(m for b in by_batch.values() for m in b["summary"]):
            points = [(int(b), part["summary"][method]) for b, part in by_batch.items() if method in part["summary"]]
            axes[0].plot([b for b, _ in points], [s["tokens_per_s"] for _, s in points], marker="o", label=method)
            tree = [(b, s["mean_verified_nodes"]) for b, s in points if s.get("mean_verified_nodes")]
            if tree:
                axes[1].plot([b for b, _ in tree], [v for _, v in tree], marker="o", label=method)
        axes[0].set_ylabel("batch throughput, tokens/s")
        axes[1].set_ylabel("verified nodes per sequence per step")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.set_xlabel("batch size")
            ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "batch_sizes.png"))

    spec = [m for m in methods if "accept_len_histogram" in summary[m] and m not in BASELINES]
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
        paths.append(_save(fig, out_dir / "accept_hist.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
