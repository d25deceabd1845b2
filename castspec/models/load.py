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
    if device.type == "cpu":
        own_embedding_memory(model, model_dir)
    return model, tokenizer


def own_embedding_memory(model, model_dir: Path) -> None:
    """Give the input embedding memory of the process's own, read from the checkpoint with plain file reads.

    `from_pretrained` maps the checkpoint: a weight's pages are read on first touch and, being clean file pages,
    may be dropped again under memory pressure. Every other large weight is read whole (and most are replaced by
    packed kernels at load), but the embedding is read one row per token: a token first seen mid-generation cost
    a page fault, up to ~30 ms measured for the 1.5B target's 0.9 GB table on a 2-core host, in the middle of a
    decoding step (and in cost-profile readings, whose tokens are random). Read with `readinto`, the table does
    not pass through the mapping (so its pages are not resident twice); where the file cannot be read that way
    (another layout or dtype), the mapped tensor is copied instead.
    """
    weight = getattr(model.get_input_embeddings(), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu":
        return
    name = next((n for n, p in model.named_parameters(remove_duplicate=False) if p is weight), None)
    readable = name is not None and weight.dtype == torch.float32
    owned = _read_float32(model_dir, name, tuple(weight.shape)) if readable else None
    with torch.no_grad():
        weight.data = owned if owned is not None else weight.data.clone()


def _read_float32(model_dir: Path, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Tensor `name` of a safetensors checkpoint in `model_dir`, read into new memory; None unless it is stored
    there as float32 with `shape`."""
    index = model_dir / "model.safetensors.index.json"
    try:
        file = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
        with open(model_dir / file, "rb") as f:
            header, data_start = _safetensors_header(f)
            info = header.get(name)
            if info is None or info["dtype"] != "F32" or tuple(info["shape"]) != shape:
                return None
            start, end = info["data_offsets"]
            out = torch.empty(shape, dtype=torch.float32)
            if end - start != out.numel() * 4:
                return None
            f.seek(data_start + start)
            view = memoryview(out.numpy()).cast("B")
            while view:  # readinto may return short counts on large reads
                got = f.readinto(view)
                if not got:
                    return None
                view = view[got:]
            return out
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer alone (cheap: to compare two models' vocabularies before loading weights)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # whatever transformers raises, the user needs the path
        raise _load_failed("the tokenizer", model_dir, e) from e


def _safetensors_header(f) -> tuple[dict, int]:
    """A .safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    (size,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(size)), 8 + size


def _safetensors_numel(path: Path) -> int:
    """Number of elements in a .safetensors file, read from its header only."""
    with open(path, "rb") as f:
        header, _ = _safetensors_header(f)
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
