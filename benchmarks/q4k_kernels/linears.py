"""Time every linear of the real target (28 layers + lm_head) for n tokens: q4k (castspec's kernels on the GGUF's
blocks) against int8 (fbgemm, rows scaled one by one), interleaved, best of 4 per n.

    .venv/bin/python benchmarks/q4k_kernels/linears.py --out benchmarks/q4k_kernels

Weights stream from memory (~1.1 GB q4k, ~1.5 GB int8: far more than the caches), as in a decoding step. Inputs are
random; the time of a linear does not depend on its values. Writes results.json and results.md into --out.
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

from castspec.cost.profiler import cpu_description  # noqa: E402
from castspec.models.formats import RowInt8Linear  # noqa: E402
from castspec.models.gguf_format import GGUFLinear, dequantize  # noqa: E402
from castspec.models.packaged import gguf_info  # noqa: E402


def load(model: str) -> tuple[list[GGUFLinear], list[RowInt8Linear]]:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(gguf_info(model)["path"])
    q4k, int8 = [], []
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight" or tensor.tensor_type.name not in ("Q4_K", "Q6_K"):
            continue
        blocks = np.asarray(tensor.data)
        q4k.append(GGUFLinear(blocks, tensor.tensor_type.name))
        weight = torch.from_numpy(dequantize(blocks, tensor.tensor_type.name, q4k[-1].in_features))
        dense = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        dense.weight.data = weight
        int8.append(RowInt8Linear(dense))
    return q4k, int8


def run_all(linears: list, inputs: dict[int, torch.Tensor]) -> float:
    start = time.perf_counter()
    for linear in linears:
        linear(inputs[linear.in_features])
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64")
    parser.add_argument("--out", default="benchmarks/q4k_kernels")
    args = parser.parse_args()
    q4k, int8 = load(args.model)
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        inputs = {k: torch.randn(n, k) for k in {m.in_features for m in q4k}}
        best = {"q4k": float("inf"), "int8": float("inf")}
        for _ in range(4):
            best["q4k"] = min(best["q4k"], run_all(q4k, inputs))
            best["int8"] = min(best["int8"], run_all(int8, inputs))
        rows.append({"tokens": n, "q4k_ms": round(best["q4k"], 1), "int8_ms": round(best["int8"], 1)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "model": args.model, "linears": len(q4k)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# All {len(q4k)} linears of {args.model}, one pass (ms, best of 4, interleaved)", "",
             f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}", "",
             "| tokens | q4k | int8 (rows) | int8 / q4k |", "|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['q4k_ms']} | {r['int8_ms']} | {r['int8_ms'] / r['q4k_ms']:.2f}x |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
