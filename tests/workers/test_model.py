"""Finding a CLIP checkpoint, choosing device and dtype, and loading it, all offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from workers.model import (
    LoadedModel,
    ModelLoadError,
    _snapshot_revision,
    choose_device,
    choose_dtype,
    choose_torch_threads,
    load_model,
    read_cpu_flags,
    resolve_checkpoint,
    usable_cpus,
)

MISSING_HUB_ID = "no-such-org/no-such-model-xyz"
SNAPSHOT_HASH = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def loaded(tiny_clip_dir: Path) -> LoadedModel:
    return load_model(str(tiny_clip_dir), device="cpu", dtype="float32")


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face home in offline mode, set in the environment and in the constants read at import.

    huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, when it is first imported, so the environment
    alone does not reach a process that imported it already.
    """
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home


def hub_load_error(name: str) -> ModelLoadError:
    # The hub client must not reach the network from the test suite.
    if not huggingface_hub.constants.is_offline_mode():
        raise RuntimeError("huggingface_hub is not in offline mode, so resolving a hub id would reach the network")
    with pytest.raises(ModelLoadError) as caught:
        resolve_checkpoint(name)
    return caught.value


def test_resolve_local_directory(tiny_clip_dir: Path) -> None:
    assert resolve_checkpoint(str(tiny_clip_dir)) == str(tiny_clip_dir.absolute())


def test_resolve_directory_without_config(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    with pytest.raises(ModelLoadError) as caught:
        resolve_checkpoint(str(folder))
    assert str(folder) in str(caught.value)
    assert "config.json" in str(caught.value)


@pytest.mark.parametrize("name", ["./no-such-model-dir", "/no/such/model-dir"])
def test_resolve_missing_path(name: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        resolve_checkpoint(name)
    assert repr(name) in str(caught.value)


def test_resolve_missing_hub_id_offline(empty_hub_cache: Path) -> None:
    message = str(hub_load_error(MISSING_HUB_ID))
    assert MISSING_HUB_ID in message
    assert "CLIPFLEET_MODEL" in message
    assert f"hf download {MISSING_HUB_ID}" in message


def test_resolve_hub_error_keeps_cause(empty_hub_cache: Path) -> None:
    error = hub_load_error(MISSING_HUB_ID)
    assert type(error.__cause__).__name__ == "LocalEntryNotFoundError"


def test_choose_device_auto() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device("auto").type == expected


def test_choose_device_cpu() -> None:
    assert choose_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_choose_device_cuda_without_gpu() -> None:
    with pytest.raises(ModelLoadError) as caught:
        choose_device("cuda")
    assert "CLIPFLEET_DEVICE=cuda" in str(caught.value)


def test_choose_dtype_auto_cpu_with_bf16() -> None:
    flags = frozenset({"avx2", "avx512f", "avx512_bf16"})
    assert choose_dtype("auto", torch.device("cpu"), flags) == torch.bfloat16


def test_choose_dtype_auto_cpu_with_amx() -> None:
    assert choose_dtype("auto", torch.device("cpu"), frozenset({"amx_bf16", "amx_tile"})) == torch.bfloat16


def test_choose_dtype_auto_cpu_without_bf16() -> None:
    # AVX-512 alone has no bfloat16 dot products, so oneDNN would emulate them.
    assert choose_dtype("auto", torch.device("cpu"), frozenset({"avx2", "avx512f"})) == torch.float32


def test_choose_dtype_float32_on_bf16_cpu() -> None:
    assert choose_dtype("float32", torch.device("cpu"), frozenset({"avx512_bf16"})) == torch.float32


def test_read_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\n")
    assert read_cpu_flags(str(cpuinfo)) == frozenset({"fpu", "sse2", "avx512_bf16"})


def test_read_cpu_flags_missing_file(tmp_path: Path) -> None:
    assert read_cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_loaded_model_logs_dtype(tiny_clip_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="workers.model")
    load_model(str(tiny_clip_dir), device="cpu", dtype="bfloat16")
    assert "image tower in bfloat16" in caplog.text


def test_choose_dtype_auto_cuda() -> None:
    # choose_dtype only reads device.type, so no GPU is needed to check the CUDA default.
    assert choose_dtype("auto", torch.device("cuda")) == torch.float16


def test_choose_dtype_explicit() -> None:
    assert choose_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_snapshot_revision_from_cache_path(tmp_path: Path) -> None:
    path = tmp_path / "models--org--name" / "snapshots" / SNAPSHOT_HASH
    assert _snapshot_revision(str(path)) == SNAPSHOT_HASH


def test_snapshot_revision_plain_directory(tmp_path: Path) -> None:
    assert _snapshot_revision(str(tmp_path / "checkpoint")) is None


def test_load_model_weights_float32(loaded: LoadedModel) -> None:
    dtypes = {parameter.dtype for parameter in loaded.model.parameters()}
    assert dtypes == {torch.float32}


def test_load_model_logit_scale(loaded: LoadedModel) -> None:
    assert loaded.logit_scale == pytest.approx(float(loaded.model.logit_scale.detach().exp()))


def test_load_model_local_revision_none(loaded: LoadedModel) -> None:
    assert loaded.revision is None


def test_load_model_eval_mode(loaded: LoadedModel) -> None:
    assert loaded.model.training is False


def test_load_model_bfloat16_keeps_float32_weights(tiny_clip_dir: Path) -> None:
    low = load_model(str(tiny_clip_dir), device="cpu", dtype="bfloat16")
    assert low.dtype == torch.bfloat16
    assert {parameter.dtype for parameter in low.model.parameters()} == {torch.float32}


def test_load_model_snapshot_revision(tiny_clip_dir: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / SNAPSHOT_HASH
    shutil.copytree(tiny_clip_dir, snapshot)
    assert load_model(str(snapshot), device="cpu", dtype="float32").revision == SNAPSHOT_HASH


def test_load_model_without_weights(tiny_clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_clip_dir / "config.json", folder / "config.json")
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(folder), device="cpu", dtype="float32")
    assert str(folder) in str(caught.value)


def test_load_model_rejects_pickle_weights(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "pickle-only"
    shutil.copytree(tiny_clip_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(folder), device="cpu", dtype="float32")
    assert "model.safetensors" in str(caught.value)


@pytest.mark.parametrize(
    ("setting", "processes", "cpus", "expected"),
    [("auto", 1, 2, 2), ("auto", 2, 2, 1), ("auto", 3, 2, 1), ("auto", 6, 16, 2), ("auto", 4, 16, 4), (3, 2, 2, 3), (1, 1, 64, 1)],
)
def test_choose_torch_threads(setting: int | str, processes: int, cpus: int, expected: int) -> None:
    assert choose_torch_threads(setting, processes, cpus) == expected


def test_usable_cpus_within_affinity() -> None:
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
