import pytest

from lora_kit.errors import LoraKitError
from lora_kit.hardware import Hardware, describe, resolve_precision

T4 = Hardware(device="cuda", name="Tesla T4", compute_capability=(7, 5), vram_gib=14.7, gpu_count=1)
H100 = Hardware(device="cuda", name="NVIDIA H100", compute_capability=(9, 0), vram_gib=79.1, gpu_count=1)
CPU = Hardware(device="cpu", name="CPU", compute_capability=None, vram_gib=None, gpu_count=0)


def test_precision_follows_compute_capability_not_emulation():
    assert resolve_precision("auto", T4) == "fp16"
    assert resolve_precision("auto", H100) == "bf16"
    assert resolve_precision("auto", CPU) == "fp32"


def test_bf16_on_a_t4_is_refused_with_the_fix():
    with pytest.raises(LoraKitError, match=r"bf16.*7\.5.*fp16"):
        resolve_precision("bf16", T4)


def test_half_precision_on_cpu_and_unknown_values_are_refused():
    with pytest.raises(LoraKitError, match="no GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(LoraKitError, match="fp8"):
        resolve_precision("fp8", H100)


def test_describe_explains_the_t4():
    text = describe(T4)
    assert "fp16" in text and "FlashAttention-2" in text and "7.5" in text
