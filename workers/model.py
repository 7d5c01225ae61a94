"""Loading a CLIP checkpoint (hub id or local directory) and choosing its device and dtype."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Files a CLIP checkpoint needs for classification; other files in a hub repository are not downloaded.
CHECKPOINT_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
# x86 CPU flags of native bfloat16 matrix instructions, which oneDNN uses for bfloat16 autocast.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded. The message names the model and how to provide it."""


@dataclass
class LoadedModel:
    """A CLIP model ready for inference, with the tokenizer and image processor saved beside it.

    Weights stay in float32; `dtype` is the autocast type of the image tower. Not thread-safe: run it from
    one thread at a time.
    """

    name: str
    revision: str | None
    path: str
    model: Any
    tokenizer: Any
    processor: Any
    device: Any
    dtype: Any
    load_s: float
    fingerprint: str
    # Resizing and normalisation equal to `processor`'s, in two steps: uint8 resize and crop in the fetch
    # threads, normalisation of the stacked batch in the model thread. None when the processor's
    # configuration is one that ImagePreprocessor does not reproduce; `processor` then runs in the threads.
    preprocessor: Any = None

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


def resolve_checkpoint(name: str, revision: str | None = None) -> str:
    """Return a local directory holding checkpoint `name`, downloading it from the hub when needed.

    A local directory is used as it is. Raises ModelLoadError naming the model and how to provide a copy
    when it is neither a directory nor available from the hub or the local hub cache.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {str(path)!r} has no config.json; point CLIPFLEET_MODEL at a CLIP checkpoint saved with save_pretrained")
        return str(path.absolute())
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory {name!r} does not exist; set CLIPFLEET_MODEL to an existing directory or a hub id")
    return _download(name, revision)


def _download(name: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, allow_patterns=CHECKPOINT_PATTERNS)
    except Exception as e:  # huggingface_hub raises many types: offline, not found, gated, HTTP errors
        raise ModelLoadError(_not_available_message(name, e)) from e


def _not_available_message(name: str, error: Exception) -> str:
    return (
        f"model {name!r} could not be loaded: it is not in the local Hugging Face cache and the hub could not "
        f"provide it ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}). "
        f"On a machine with network access run `hf download {name} --local-dir ./{name.split('/')[-1]}`, "
        f"copy that directory here and set CLIPFLEET_MODEL to its path (or pass --model PATH)."
    )


def choose_device(setting: str) -> Any:
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CLIPFLEET_DEVICE=cuda but torch finds no CUDA device; use auto or cpu")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


def choose_dtype(setting: str, device: Any, cpu_flags: frozenset[str] | None = None) -> Any:
    """Return the image tower's compute dtype.

    `auto` picks float16 on CUDA, bfloat16 on a CPU with bfloat16 instructions (AVX512-BF16 or AMX-BF16,
    read from `cpu_flags`, by default /proc/cpuinfo), and float32 on other CPUs, where bfloat16 would be
    emulated and slower than float32.
    """
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.float16
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    return torch.bfloat16 if flags & BF16_CPU_FLAGS else torch.float32


def choose_torch_threads(setting: int | str, pool_processes: int, cpus: int) -> int:
    """Return the intra-op threads of one worker process: `setting` when it is a number, else for `auto`
    the `cpus` that the worker may use divided among its `pool_processes`, at least 1.

    Several processes that each run as many threads as there are CPUs make the threads of each forward
    pass wait for one another on a busy CPU, and torch's default ignores a container's CPU quota.
    """
    if setting != "auto":
        return int(setting)
    return max(1, cpus // max(1, pool_processes))


def usable_cpus() -> int:
    """Return the CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota rounded up, as
    Celery counts them for `--concurrency auto`."""
    from celery.utils.sysinfo import cpu_budget

    return cpu_budget(use_cgroup_quota=True).count


def read_cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset[str]:
    """Return the CPU feature flags listed in /proc/cpuinfo, or an empty set where that file is missing (not Linux)."""
    try:
        with open(cpuinfo_path, encoding="ascii", errors="replace") as file:
            for line in file:
                name, _, value = line.partition(":")
                if name.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def load_model(name: str, revision: str | None = None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load model, tokenizer and image processor through `from_pretrained`. Raises ModelLoadError.

    Weights load from safetensors files only, and no code from the checkpoint runs: pickle-based
    `pytorch_model.bin` files can execute code when unpickled, and `trust_remote_code` stays off.
    """
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    started = time.perf_counter()
    path = resolve_checkpoint(name, revision)
    torch_device = choose_device(device)
    try:
        model = CLIPModel.from_pretrained(
            path, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        ).to(torch_device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        processor = CLIPImageProcessorPil.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model {name!r} at {path!r} could not be loaded: {e}") from e
    load_s = time.perf_counter() - started
    resolved_revision = revision or _snapshot_revision(path)
    compute_dtype = choose_dtype(dtype, torch_device)
    logger.info(
        "Loaded model %s (revision %s) on %s, image tower in %s, in %.1f s",
        name, resolved_revision, torch_device, str(compute_dtype).removeprefix("torch."), load_s,
    )
    return LoadedModel(
        name, resolved_revision, path, model, tokenizer, processor, torch_device,
        compute_dtype, load_s, checkpoint_fingerprint(path), _preprocessor_for(processor, name),
    )


def _preprocessor_for(processor: Any, name: str) -> Any:
    from workers.preprocess import ImagePreprocessor

    try:
        return ImagePreprocessor.from_processor(processor)
    except ValueError as e:
        logger.warning("Model %s: its image processor runs unchanged in the fetch threads, which is slower: %s", name, e)
        return None


def checkpoint_fingerprint(path: str) -> str:
    """Return a digest of the checkpoint's file names, sizes and modification times.

    It changes when a local checkpoint folder is replaced in place, which its path alone would not show.
    """
    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.is_file() and file.suffix in (".json", ".txt", ".safetensors", ".bin"):
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _snapshot_revision(path: str) -> str | None:
    """Return the commit hash of a hub cache snapshot directory (`.../snapshots/<commit>`), else None."""
    parent = Path(path).parent
    return Path(path).name if parent.name == "snapshots" else None
