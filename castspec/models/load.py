"""Turn a model argument (a built-in name or a local HF directory) into a loaded model and tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from castspec.errors import CastspecError
from castspec.models.packaged import (
    BUILTIN_MODELS,
    MARKER,
    castspec_home,
    ensure_converted,
)


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A built-in name -> its converted cache directory (converting on first use); a directory with config.json ->
    that directory. Returns an absolute path, so two spellings of one model compare equal. A built-in name wins
    over a same-named directory in the current one (write `./name` for that)."""
    s = os.fspath(name_or_path)
    if s in BUILTIN_MODELS:
        return ensure_converted(s).resolve()
    p = Path(s).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    names = ", ".join(BUILTIN_MODELS)
    raise CastspecError(f"unknown model {s!r}: not a directory with config.json nor one of: {names}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _load_failed(what: str, model_dir: Path, e: BaseException) -> CastspecError:
    msg = f"cannot load {what} from {model_dir} ({_first_line(e)})"
    try:
        if model_dir.resolve().parent == (castspec_home() / "models").resolve():
            msg += f"; the cached conversion is damaged: delete {model_dir} and run again to reconvert it"
    except OSError:
        pass
    return CastspecError(msg)


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a built-in name or a local HF directory: eval mode, no gradients, SDPA attention,
    nothing fetched from the network."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(name_or_path)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CastspecError(f"invalid device {device!r} ({_first_line(e)})") from e
    tokenizer = load_tokenizer(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype,
                                                     attn_implementation="sdpa")
    except Exception as e:
        raise _load_failed("the model", model_dir, e) from e
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise CastspecError(f"cannot move {model_dir} to device {device} ({_first_line(e)})") from e
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer alone (cheap: to compare two models' vocabularies before loading weights)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # whatever transformers raises, the user needs the path
        raise _load_failed("the tokenizer", model_dir, e) from e


def _safetensors_numel(path: Path) -> int:
    """Number of elements in a .safetensors file, read from its header only."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for key, info in header.items():
        if key != "__metadata__":
            numel = 1
            for d in info["shape"]:
                numel *= d
            total += numel
    return total


def model_identity(model_dir: str | os.PathLike) -> dict:
    """What identifies a model directory in cost tables and bench records, without loading it: name, architecture,
    parameter count (a tied lm_head counted once) and a short hash of config.json plus the weight files' sizes."""
    d = resolve_model_dir(model_dir)
    config_bytes = (d / "config.json").read_bytes()
    try:
        config = json.loads(config_bytes)
    except ValueError as e:
        raise CastspecError(f"{d / 'config.json'} is not valid JSON ({e})") from e
    weights = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    h = hashlib.sha256(config_bytes)
    for p in weights:
        h.update(f"\0{p.name}\0{p.stat().st_size}".encode())
    marker = {}
    if (d / MARKER).is_file():
        try:
            marker = json.loads((d / MARKER).read_text())
        except ValueError:
            marker = {}
    st = [p for p in weights if p.suffix == ".safetensors"]
    if marker.get("num_params"):
        num_params = int(marker["num_params"])
    elif st:
        num_params = sum(_safetensors_numel(p) for p in st)
    else:
        num_params = None
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return {
        "name": marker.get("name") or d.name,
        "path": str(d),
        "architecture": archs[0],
        "model_type": config.get("model_type"),
        "num_params": num_params,
        "num_layers": config.get("num_hidden_layers"),
        "vocab_size": config.get("vocab_size"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "hash": h.hexdigest()[:12],
        "source_packages": marker.get("source_packages"),
    }
