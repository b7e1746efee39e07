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


def test_busy_cores_from_two_samples_of_proc_stat():
    from lora_kit.hardware import busy_cores

    # 2 cores over 100 jiffies each: 100 of the 200 were busy, so one core's worth.
    assert busy_cores((1000, 5000), (1100, 5200), cores=2) == 1.0
    assert busy_cores((0, 0), (0, 0), cores=4) == 0.0  # no time passed: nothing to say


def test_share_cpu_keeps_torch_to_the_free_cores(monkeypatch):
    import torch

    from lora_kit import hardware

    samples = iter([(1000, 5000), (1190, 5200)])  # 1.9 of 2 cores busy elsewhere
    monkeypatch.setattr(hardware, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1}, raising=False)  # a 2-core machine
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        text = hardware.share_cpu(sample_s=0)
        assert torch.get_num_threads() == 1 and "about 1.9 of this machine's 2 cores busy" in text
    finally:
        torch.set_num_threads(threads)
