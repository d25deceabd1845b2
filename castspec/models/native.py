"""Build and load castspec's own C++ CPU kernels (`native/gguf_kernels.cpp`: Q4_K/Q6_K matmuls;
`native/decoder_layer.cpp`: a whole decoder layer) once per machine.

The library is compiled with g++ on first use (about two seconds) into `castspec_home()/kernels/<key>/`, where the
key hashes the sources, the flags and torch's version, and loaded with ctypes. It uses OpenMP from torch's own
bundled libgomp (same soname, already loaded by `import torch`), so its threads are torch's threads: one pool, sized
by `torch.set_num_threads`, no second runtime spinning beside it. A file lock keeps two processes from building the
same library at once. `unavailable_reason()` says in one line why the kernels cannot run here (not x86 with
AVX2/FMA/F16C, no compiler, a failed build); callers turn it into a clear error.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from castspec.errors import CastspecError

SOURCES = tuple(Path(__file__).with_name("native") / name for name in ("gguf_kernels.cpp", "decoder_layer.cpp"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++")


@functools.cache
def build_key() -> str:
    """Identity of the kernels built here: their sources, flags and torch's version (a cost measured with other
    kernels does not describe these)."""
    text = b"".join(source.read_bytes() for source in SOURCES)
    return hashlib.sha256(text + " ".join(FLAGS).encode() + torch.__version__.encode()).hexdigest()[:16]


def _build_dir() -> Path:
    from castspec.models.packaged import castspec_home

    return castspec_home() / "kernels" / build_key()


def _build(target: Path, compiler: str) -> None:
    torch_lib = Path(torch.__file__).parent / "lib"
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        command = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(out), f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["(no output)"])[0]
            raise CastspecError(f"building castspec's CPU kernels failed: {first}")
        os.replace(out, target)


@functools.cache
def _library_or_reason() -> ctypes.CDLL | str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"castspec's quantized CPU kernels need an x86-64 CPU, this is {platform.machine()}"
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        return f"castspec's quantized CPU kernels need AVX2, FMA and F16C; this CPU lacks {', '.join(missing)}"
    compiler = _compiler()
    if compiler is None:
        return "castspec's quantized CPU kernels are built on first use and need a C++ compiler (g++); none found"
    from castspec.models.packaged import _lock

    target = _build_dir() / "libcastspec_gguf.so"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _lock(target.parent / ".lock", "building castspec's CPU kernels"):
            if not target.is_file():
                _build(target, compiler)
    except CastspecError as e:
        return str(e)
    library = ctypes.CDLL(str(target))
    # quantize_rows(x, n, k, xq, scales, sums16, sums32)
    # q*_matmul(w, m, k, xq, scales, sums16, sums32, n, out, out's row stride, rows end in a half record)
    library.quantize_rows.argtypes = [_POINTER, _INT64, _INT64, _POINTER, _POINTER, _POINTER, _POINTER]
    for name in ("q4k_matmul", "q6k_matmul"):
        getattr(library, name).argtypes = [_POINTER, _INT64, _INT64, _POINTER, _POINTER, _POINTER, _POINTER, _INT64,
                                           _POINTER, _INT64, _INT64]
    # matmul_groups(w, is Q6_K, k, half, group ids, count, xq, scales, sums16, sums32, n, out, out's row stride)
    library.matmul_groups.argtypes = [_POINTER, _INT64, _INT64, _INT64, _POINTER, _INT64, _POINTER, _POINTER, _POINTER,
                                      _POINTER, _INT64, _POINTER, _INT64]
    # select_groups(coarse, rows, columns, row stride, bound, norms, kept group ids) -> count (-1: not finite)
    library.select_groups.argtypes = [_POINTER, _INT64, _INT64, _INT64, _POINTER, _POINTER, _POINTER]
    library.select_groups.restype = _INT64
    library.decoder_layer.argtypes = [_POINTER] * 5  # (layer spec, step spec, hidden, key cache, value cache)
    library.decoder_layer_kept.argtypes = [_POINTER] * 6 + [_INT64]  # ..., kept row indices, their count
    for name in ("quantize_rows", "q4k_matmul", "q6k_matmul", "matmul_groups", "decoder_layer", "decoder_layer_kept"):
        getattr(library, name).restype = None
    return library


def unavailable_reason() -> str | None:
    """Why the kernels cannot run on this machine, in one line; None when they can."""
    found = _library_or_reason()
    return found if isinstance(found, str) else None


def library() -> ctypes.CDLL:
    """The loaded kernel library (built now if needed); a clear `CastspecError` when it cannot be."""
    found = _library_or_reason()
    if isinstance(found, str):
        raise CastspecError(found)
    return found
