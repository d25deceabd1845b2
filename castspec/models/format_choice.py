"""`--target-dtype auto`: the fastest target format on this machine among those whose quality passed the gate.

Quality is measured offline per built-in model and shipped in `format_quality.json` (README, "Target formats"):
teacher-forced greedy agreement with fp32 (`tools/teacher_forced_agreement.py`) and HumanEval pass@1 over all 164
problems (`tools/humaneval_pass.py`). A format is eligible when its agreement is at least `MIN_AGREEMENT` and its
pass@1 at most `MAX_PASS1_DROP` below fp32's, both measured; fp32, the exact model, always is. A model without a
record (any non-built-in model) runs fp32.

Speed is measured here, never assumed from another host: one linear of a typical decoder shape at one token, in
each eligible format that can run on this device, best of a few runs (well under a second), cached per CPU and
torch version under `castspec_home()/formats/`. The formats rank the same way as whole decode steps because a
plain decoding step is dominated by its linears (README: q4k 47 ms of ~50, fp32 ~480 of ~500).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
from torch import nn

MIN_AGREEMENT = 0.97
MAX_PASS1_DROP = 0.02  # pass@1 may be at most 2 points below fp32's
QUALITY_FILE = Path(__file__).with_name("format_quality.json")
SHAPE = (1536, 8960)  # in, out: an MLP projection of the 1.5B target (the measurement only ranks the formats)


@functools.cache
def quality_records() -> dict:
    return json.loads(QUALITY_FILE.read_text())


def eligible_formats(model: str) -> list[str]:
    """fp32 and every format of `model` whose measured quality passes the gate."""
    record = quality_records().get(model, {})
    base = record.get("fp32", {}).get("pass1")
    eligible = ["fp32"]
    for fmt, measured in record.items():
        agreement, pass1 = measured.get("agreement"), measured.get("pass1")
        if fmt != "fp32" and None not in (agreement, pass1, base) and agreement >= MIN_AGREEMENT \
                and pass1 >= base - MAX_PASS1_DROP:
            eligible.append(fmt)
    return eligible


def runnable_here(fmt: str, device: str) -> bool:
    if fmt == "fp32":
        return True
    if torch.device(device).type != "cpu":
        return False
    if fmt == "q4k":
        from castspec.models.native import unavailable_reason

        return unavailable_reason() is None
    return True


def _format_linear(fmt: str) -> nn.Module:
    """A random linear of `SHAPE` in format `fmt`."""
    generator = torch.Generator().manual_seed(0)
    dense = nn.Linear(*SHAPE, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(dense.weight.shape, generator=generator) * 0.02)
    holder = nn.Sequential(dense)
    if fmt == "q4k":
        from castspec.models.gguf_format import use_gguf_linears

        use_gguf_linears(holder)
    elif fmt == "int8":
        from castspec.models.formats import quantize_int8_rows

        quantize_int8_rows(holder)
    else:
        from castspec.models.kernels import use_fast_cpu_linears

        use_fast_cpu_linears(holder)
    return holder[0]


@torch.inference_mode()
def measure_ms(fmt: str, repeats: int = 5) -> float:
    """Best-of-`repeats` milliseconds of one `SHAPE` linear at one token in format `fmt` on the CPU."""
    linear = _format_linear(fmt)
    x = torch.randn(1, SHAPE[0])
    linear(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            linear(x)
        best = min(best, (time.perf_counter() - start) / 4 * 1000)
    return best


def _cache_path() -> Path:
    from castspec.models.native import _cpu_flags
    from castspec.models.packaged import castspec_home

    cpu = "avx512" if "avx512f" in _cpu_flags() else "avx2" if "avx2" in _cpu_flags() else "other"
    return castspec_home() / "formats" / f"{cpu}-{torch.get_num_threads()}t-torch{torch.__version__}.json"


def measured_ms(formats: list[str]) -> dict[str, float]:
    """Milliseconds per format, measured once per machine kind and thread count (cached)."""
    path = _cache_path()
    cached = json.loads(path.read_text()) if path.is_file() else {}
    missing = [fmt for fmt in formats if fmt not in cached]
    if missing:
        cached.update({fmt: round(measure_ms(fmt), 4) for fmt in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    return {fmt: cached[fmt] for fmt in formats}


def choose_target_dtype(model: str, device: str) -> tuple[str, str]:
    """(format, one-line reason) for `--target-dtype auto`."""
    candidates = [fmt for fmt in eligible_formats(model) if runnable_here(fmt, device)]
    if candidates == ["fp32"]:
        return "fp32", "the only format with a passed quality check for this model on this device"
    times = measured_ms(candidates) if torch.device(device).type == "cpu" else {"fp32": 0.0}
    best = min(times, key=times.get)
    listed = ", ".join(f"{fmt} {ms:.2f} ms" for fmt, ms in sorted(times.items(), key=lambda kv: kv[1]))
    return best, f"fastest here among formats that passed the quality check ({listed} per {SHAPE[0]}x{SHAPE[1]} " \
                 f"linear at one token)"
