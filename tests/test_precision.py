"""Precision by capability: bf16 autocast and bf16 vLLM weights only where the hardware does bf16
natively (AVX512_BF16 or AMX on a CPU), fp32 elsewhere; an explicit setting wins, and every shipped
training config leaves the choice to the hardware."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from her_engines import native_bf16, native_bf16_reason
from her_engines._precision import cpu_flags
from her_engines._vllm import CPU_DEFAULTS, vllm_platform_defaults
from policy_trainer._setup import with_precision

CONFIGS = Path(__file__).resolve().parent.parent / "policy_trainer" / "configs"
TRAINER_SECTIONS = ("sft", "grpo")

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw{extra}
bogomips\t: 5192.24
"""


@pytest.mark.parametrize(("extra", "native"), [
    ("", False),                      # AVX2 / AVX512 without bf16 dot products: emulated
    (" avx512_bf16", True),           # Zen 4+, Cooper Lake
    (" amx_tile amx_bf16", True),     # Sapphire Rapids
])
def test_native_bf16_is_read_from_the_cpu_flags(extra, native):
    flags = cpu_flags(CPUINFO.format(extra=extra))
    assert "avx2" in flags and "bogomips" not in flags
    ok, why = native_bf16_reason(flags, cuda=False)
    assert ok is native
    assert ("emulated" in why) is (not native)


def test_no_cpuinfo_means_no_native_bf16():
    assert cpu_flags("processor : 0\n") == frozenset()
    assert native_bf16_reason(frozenset(), cuda=False)[0] is False


def test_this_machine_answers_from_its_own_flags():
    assert native_bf16() is native_bf16_reason(cpu_flags(), cuda=False)[0]


def test_vllm_on_cpu_stays_fp32_and_warns_about_emulated_bf16(monkeypatch, caplog):
    """Serving keeps fp32 on every CPU (batch-invariant near-tie verdicts); asking for bf16 where it would be
    emulated is allowed but logged."""
    import her_engines._vllm as vllm_module

    assert vllm_platform_defaults("cpu") == CPU_DEFAULTS and CPU_DEFAULTS["dtype"] == "float32"
    assert vllm_platform_defaults("cuda") == {}  # vLLM's own defaults on GPUs
    monkeypatch.setattr(vllm_module, "native_bf16_reason", lambda: (False, "CPU has no avx512_bf16"))
    with caplog.at_level(logging.WARNING, logger="her_engines"), pytest.raises(vllm_module.EngineUnavailable):
        vllm_module.VLLMEngine("/nonexistent/model-folder", dtype="bfloat16")
    assert "fp32 would be faster" in caplog.text


def test_trainer_bf16_is_decided_by_the_hardware_unless_set(monkeypatch, caplog):
    import her_engines

    for native in (True, False):
        monkeypatch.setattr(her_engines, "native_bf16_reason", lambda native=native: (native, "flags"))
        with caplog.at_level(logging.INFO, logger="policy_trainer._setup"):
            caplog.clear()
            assert with_precision("sft", {"use_cpu": True})["bf16"] is native
        assert "sft.bf16 unset" in caplog.text
        # an explicit choice wins, and fp16 is never combined with a chosen bf16
        assert with_precision("grpo", {"bf16": not native})["bf16"] is (not native)
        assert "bf16" not in with_precision("grpo", {"fp16": True})


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("accel")))
def test_shipped_training_configs_leave_bf16_to_the_hardware(name):
    raw = yaml.safe_load((CONFIGS / name).read_text())
    sections = [raw[s] for s in TRAINER_SECTIONS if s in raw]
    assert sections, f"{name} has no trainer section"
    for section in sections:
        assert "bf16" not in section and "fp16" not in section, name


def test_a_shipped_config_resolves_to_this_machines_precision():
    from policy_trainer._genrm import GenRMRunConfig
    from policy_trainer._grpo import GRPORunConfig

    genrm = GenRMRunConfig.from_yaml(CONFIGS / "genrm_cpu.yaml", pairs=[str(CONFIGS / "genrm_cpu.yaml")])
    assert genrm.trl_args().bf16 is native_bf16()
    grpo = GRPORunConfig.from_yaml(CONFIGS / "grpo_cpu_smoke.yaml")
    assert grpo.trl_args().bf16 is native_bf16()
