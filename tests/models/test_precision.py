"""`train.precision: auto` is decided by detected capability: bf16 only where the device runs it natively."""
from __future__ import annotations

import pytest
import torch

from recsys import hardware
from recsys.models import precision
from recsys.models.build import build_model
from recsys.models.model import TrainTask


@pytest.fixture(autouse=True)
def _fresh_precision_cache():
    precision.effective_precision.cache_clear()
    yield
    precision.effective_precision.cache_clear()  # later tests must see the real machine again


def _fake_cpu(monkeypatch, capability: str, flags=()):
    """Pretend to run on a CPU with this torch capability and these ISA flags."""
    fake = hardware.CpuInfo(model="Test CPU", capability=capability, flags=frozenset(flags), cores=2)
    monkeypatch.setattr(hardware, "cpu_info", lambda: fake)
    precision.effective_precision.cache_clear()


def test_auto_is_fp32_where_bf16_is_not_native(monkeypatch):
    for capability in ("AVX2", "AVX512", "DEFAULT"):  # plain AVX512 has no bf16 dot products either
        _fake_cpu(monkeypatch, capability, flags=("amx_tile",) if capability == "AVX512" else ())
        chosen, why = precision.resolve_precision("auto", "cpu")
        assert chosen == "fp32", (capability, why)
        assert "auto -> fp32" in why and capability in why and "Test CPU" in why


def test_auto_is_bf16_where_native_and_explicit_settings_are_honoured(monkeypatch):
    for flags in (("avx512_bf16",), ("amx_bf16", "amx_tile"), ("bf16",)):
        _fake_cpu(monkeypatch, "AVX512", flags)
        assert precision.resolve_precision("auto", "cpu")[0] == "bf16"
        assert precision.resolve_precision("fp32", "cpu") == ("fp32", "train.precision: fp32 set explicitly")
    _fake_cpu(monkeypatch, "AVX2")
    assert precision.resolve_precision("bf16", "cpu")[0] == "bf16"  # explicit: honoured even where slow


def test_auto_model_runs_fp32_on_a_cpu_without_native_bf16(monkeypatch, tiny_spec):
    from recsys.data.loader import BatchLoader

    _fake_cpu(monkeypatch, "AVX2")
    # dropout off: precision applies to training steps, so the models are compared in train mode (no_grad)
    auto, fp32 = tiny_spec("model.dropout=0"), tiny_spec("train.precision=fp32", "model.dropout=0")
    assert auto.train.precision == "auto"  # the default
    torch.manual_seed(0)
    task_fp32 = TrainTask(build_model(fp32, torch.device("cpu")), fp32)
    task_auto = TrainTask(build_model(auto, torch.device("cpu")), auto)
    task_auto.load_state_dict(task_fp32.state_dict())
    batch = next(iter(BatchLoader(fp32, "train", batch_size=64, shuffle=False)))
    with torch.no_grad():
        assert torch.equal(task_auto.model(batch).logits, task_fp32.model(batch).logits)
        _fake_cpu(monkeypatch, "AVX512", ("avx512_bf16",))  # the same spec on a bf16-native CPU autocasts
        assert not torch.equal(task_auto.model(batch).logits, task_fp32.model(batch).logits)


def test_hardware_description_names_the_machine():
    text = hardware.describe()
    cpu = hardware.cpu_info()
    assert cpu.model in text and cpu.capability == torch.backends.cpu.get_cpu_capability() and cpu.cores >= 1
