"""Tests for lora_kit.memory: exact parameter counts, the estimates against GPU measurements, settings that fit."""

import matplotlib
import pytest
from transformers import LlamaConfig

from lora_kit import memory
from lora_kit.errors import LoraKitError
from lora_kit.quant import bits_per_parameter


@pytest.fixture(scope="module")
def c7():
    return memory.llama2_7b_config()


def smollm2_135m_config():
    """SmolLM2-135M's shape: GQA (9 heads, 3 KV heads) and tied embeddings."""
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )


def test_llama2_7b_parameter_count_is_the_known_figure(c7):
    assert memory.count_parameters(c7) == 6_738_415_616


def test_gqa_and_tied_embeddings_are_counted():
    # 134.5 M, the figure transformers reports for the embedded SmolLM2-135M-Instruct.
    assert memory.count_parameters(smollm2_135m_config()) == 134_515_008
    shapes = memory.projection_shapes(smollm2_135m_config())
    assert shapes["k_proj"] == (576, 192) and shapes["q_proj"] == (576, 576)


def test_65b_parameter_count():
    assert memory.count_parameters(memory.llama_65b_config()) == 65_285_660_672


def test_attention_bias_adds_parameters(c7):
    with_bias = memory.llama2_7b_config()
    with_bias.attention_bias = True
    assert memory.count_parameters(with_bias) - memory.count_parameters(c7) == 32 * 4 * 4096


def test_lora_parameter_counts(c7):
    assert memory.lora_parameter_count(c7, 64, "all-linear") == 159_907_840
    assert memory.lora_parameter_count(c7, 64, list(memory.PROJECTIONS)) == 159_907_840
    assert memory.lora_parameter_count(c7, 8, ["q_proj", "v_proj"]) == 4_194_304


def test_unknown_target_module_raises_a_helpful_error(c7):
    with pytest.raises(LoraKitError, match="q_proj"):
        memory.lora_parameter_count(c7, 8, ["query"])


def test_method_ordering(c7):
    totals = {m: b.total_gib for m, b in memory.compare_methods(c7).items()}
    assert totals["full"] > totals["lora"] > totals["lora8"] > totals["qlora"]


def test_full_fine_tuning_is_16_bytes_per_parameter(c7):
    b = memory.memory_breakdown(c7, "full")
    per_param = (b.weights + b.gradients + b.optimizer_states) * 2**30 / b.parameters
    assert per_param == pytest.approx(16)


def test_qlora_weights_use_4_127_bits_on_decoder_linears_and_fp32_elsewhere(c7):
    b = memory.memory_breakdown(c7, "qlora")
    params = memory.count_parameters(c7)
    embeddings_and_head = 2 * 32000 * 4096
    norms = 65 * 4096
    linear = params - embeddings_and_head - norms
    # prepare_model_for_kbit_training casts what is not quantized to fp32: 4 bytes each.
    expected = (linear * 4.127 / 8 + (embeddings_and_head + norms) * 4) / 2**30
    assert b.weights == pytest.approx(expected, rel=0.01)
    no_dq = memory.memory_breakdown(c7, "qlora", double_quant=False)
    assert no_dq.weights - b.weights == pytest.approx(linear * (4.5 - bits_per_parameter()) / 8 / 2**30)


def test_adapters_are_fp32_with_adamw_states_except_bf16_qlora(c7):
    b = memory.memory_breakdown(c7, "lora", r=64)
    n = 159_907_840
    assert b.trainable_parameters == n
    assert b.adapters * 2**30 == n * 4 and b.optimizer_states * 2**30 == n * 8
    assert b.gradients * 2**30 == n * 4  # at the peak (backward reaches the first block), every gradient is alive
    assert memory.memory_breakdown(c7, "qlora", r=64, precision="bf16").adapters * 2**30 == n * 2
    assert memory.memory_breakdown(c7, "qlora", r=64, precision="fp16").adapters * 2**30 == n * 4


def test_paged_optimizer_states_leave_the_allocated_count(c7):
    # bitsandbytes pages only states of 100,000 elements or more: at r=16 every matrix with a 4096 side stays (16 x
    # 4096: A and B of q, k, v, o, the A of gate and up, the B of down); the MLP's 16 x 11008 ones are paged.
    paged = memory.memory_breakdown(c7, "qlora", r=16, optimizer="paged_adamw_32bit")
    plain = memory.memory_breakdown(c7, "qlora", r=16, optimizer="adamw_torch")
    assert plain.paged_optimizer_states == 0
    assert paged.optimizer_states + paged.paged_optimizer_states == pytest.approx(plain.optimizer_states)
    assert paged.optimizer_states == pytest.approx(32 * 11 * 16 * 4096 * 8 / 2**30)
    assert paged.device_gib > paged.total_gib + paged.paged_optimizer_states  # the device also holds those


def test_checkpointing_and_batch_change_activations(c7):
    on = memory.memory_breakdown(c7, "qlora")
    off = memory.memory_breakdown(c7, "qlora", gradient_checkpointing=False)
    assert off.activations > 5 * on.activations
    assert off.weights == on.weights
    bigger = memory.memory_breakdown(c7, "qlora", micro_batch=2)
    assert bigger.activations == pytest.approx(2 * on.activations)
    eager = memory.memory_breakdown(c7, "qlora", gradient_checkpointing=False, fused_attention=False)
    assert eager.activations > off.activations


def test_a_large_vocabulary_makes_the_loss_the_peak():
    # Qwen2.5-7B's 152,064 logits per token outweigh backward through one block: no gradient is alive yet then.
    qwen = LlamaConfig(**memory.decoder_shape(3584, 18944, 28, 28, 4, 152064, False))
    b = memory.memory_breakdown(qwen, "qlora", r=16, micro_batch=2, seq_len=1024)
    assert b.gradients == 0
    logits = 2 * 1024 * 152064 * memory.LOGIT_BYTES / 2**30
    residual = 2 * 1024 * 28 * 3584 * 4 / 2**30
    assert b.activations == pytest.approx(logits + residual)


def _measured_points():
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "memory_estimates.json"
    return json.loads(results.read_text())["points"]


SHAPES = {
    "llama2-7b": memory.LLAMA2_7B,
    "smollm2-1.7b": memory.SMOLLM2_1_7B,
    "qwen2.5-7b": memory.decoder_shape(3584, 18944, 28, 28, 4, 152064, False),
}


def test_estimates_match_every_point_measured_on_the_gpu():
    # benchmarks/bench_memory.py: lora_kit's training path on an H200, 33 settings. The estimate, recomputed here,
    # must stay within -5% and +10% of the measured peak allocated memory, and count the weights to 1%.
    points = _measured_points()
    assert len(points) >= 24 and {p["method"] for p in points} == {"qlora", "lora8", "lora"}
    for p in points:
        b = memory.memory_breakdown(
            LlamaConfig(**SHAPES[p["model"]]),
            p["method"],
            r=p["r"],
            micro_batch=p["micro_batch"],
            seq_len=p["seq_len"],
            gradient_checkpointing=p["gradient_checkpointing"],
            optimizer=p["optimizer"],
            precision=p["precision"],
        )
        error = (b.total_gib - p["measured_gib"]) / p["measured_gib"]
        assert -0.05 <= error <= 0.10, (p, b.total_gib)
        assert b.weights == pytest.approx(p["weights_gib"], rel=0.01), p
        assert b.paged_optimizer_states == pytest.approx(p["paged_states_gib"], abs=0.01), p


def test_the_published_auto_fit_runs_are_what_fit_settings_chooses_today():
    # benchmarks/results/memory_estimates.json "autofit": fit_settings' choices trained on the GPU under each cap. If
    # the estimate or the slack changes, the choices change and those runs no longer stand for the code.
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "memory_estimates.json"
    runs = json.loads(results.read_text())["autofit"]
    optimizer = {"qlora": "paged_adamw_32bit", "lora8": "adamw_torch", "lora": "adamw_torch"}
    assert {(r["budget_gib"], r["method"]) for r in runs} == {
        (b, m) for b in (15.0, 24.0, 40.0) for m in ("qlora", "lora8", "lora")
    }
    for run in runs:
        choice = memory.fit_settings(
            LlamaConfig(**SHAPES[run["model"]]),
            run["method"],
            run["budget_gib"],
            max_length=run["max_length"],
            r=run["r"],
            optimizer=optimizer[run["method"]],
            precision=run["precision"],
        )
        assert (choice.micro_batch_size, choice.max_length) == (run["micro_batch"], run["max_length"]), run
        assert run["trained"] and run["used_fraction"] >= 0.70, run


def test_fit_settings_picks_the_largest_micro_batch_that_fits(c7):
    choice = memory.fit_settings(c7, "qlora", 15.0, max_length=1024, r=64, optimizer="paged_adamw_32bit")
    usable = 15.0 * 0.9
    assert choice.estimate.device_gib <= usable
    one_more = memory.memory_breakdown(
        c7, "qlora", r=64, optimizer="paged_adamw_32bit", micro_batch=choice.micro_batch_size + 1, seq_len=1024
    )
    assert one_more.device_gib > usable
    assert choice.max_length == 1024 and choice.gradient_checkpointing
    assert choice.micro_batch_size * choice.gradient_accumulation_steps >= 8 or choice.gradient_accumulation_steps == 1
    assert "Estimated" in str(choice) and "of 15.0 GiB" in str(choice)
    # A budget with room for more than one sample of 64 tokens but not for one of 32,768: max_length is halved.
    short = memory.fit_settings(c7, "qlora", 12.0, max_length=32768, r=64, optimizer="paged_adamw_32bit")
    assert short.max_length < 32768 and "halved" in short.reasons["max_length"]
    assert "tile_layers=True" in short.reasons["max_length"]  # and where longer samples would fit
    assert short.offload_activations  # block inputs in CPU RAM fit a longer sample than on the GPU
    # A small model with room to spare runs without checkpointing when the same micro-batch fits.
    small = memory.fit_settings(smollm2_135m_config(), "lora", 80.0, max_length=512, max_micro_batch=4)
    assert small.micro_batch_size == 4 and not small.gradient_checkpointing


def test_fit_settings_offloads_activations_only_where_that_fits_a_longer_sample(c7):
    long = dict(r=64, optimizer="paged_adamw_32bit", precision="fp16", fp32_norms=False, tile_layers=True)
    usable = 15.0 * 0.9
    choice = memory.fit_settings(c7, "qlora", 15.0, max_length=16384, **long)
    assert choice.offload_activations and choice.gradient_checkpointing and choice.max_length == 16384
    assert "fits only with each block's input in CPU RAM" in choice.reasons["offload_activations"]
    assert "offload_activations = True" in str(choice)
    on_gpu = memory.memory_breakdown(c7, "qlora", micro_batch=1, seq_len=16384, **long)
    assert choice.estimate.device_gib <= usable < on_gpu.device_gib  # without offloading it would not fit
    asked = memory.fit_settings(c7, "qlora", 15.0, max_length=16384, offload_activations=False, **long)
    assert (
        not asked.offload_activations
        and asked.max_length < 16384
        and asked.reasons["offload_activations"] == "as asked"
    )
    short = memory.fit_settings(c7, "qlora", 15.0, max_length=1024, **long)
    assert not short.offload_activations and "(faster)" in short.reasons["offload_activations"]
    with pytest.raises(LoraKitError, match="offloading needs checkpointing"):
        memory.fit_settings(c7, "qlora", 15.0, offload_activations=True, gradient_checkpointing=False)


def test_fit_settings_says_when_not_even_the_weights_fit(c7):
    with pytest.raises(LoraKitError, match=r"budget is 10\.00 GiB.*Try method 'lora8'"):
        memory.fit_settings(c7, "lora", 10.0)
    with pytest.raises(LoraKitError, match=r"weights 4\.1 GiB.*a smaller model.*FSDP.*fsdp-qlora.yaml"):
        memory.fit_settings(c7, "qlora", 5.0, r=64, optimizer="paged_adamw_32bit")
    with pytest.raises(LoraKitError, match=r"a GPU with more memory\.$"):  # not even the weights: no FSDP either
        memory.fit_settings(c7, "qlora", 4.0, r=64, optimizer="paged_adamw_32bit")


def test_as_dict_has_every_component_and_total(c7):
    d = memory.memory_breakdown(c7, "lora8").as_dict()
    for key in ("weights", "adapters", "gradients", "optimizer_states", "activations", "total_gib"):
        assert key in d
    assert d["total_gib"] == pytest.approx(
        sum(d[k] for k in ("weights", "adapters", "gradients", "optimizer_states", "activations"))
    )


def test_bad_method_raises(c7):
    with pytest.raises(LoraKitError, match="qlora"):
        memory.memory_breakdown(c7, "4bit")


def test_plot_has_one_bar_per_method_and_labelled_axes(c7):
    breakdowns = memory.compare_methods(c7)
    fig = memory.plot_memory_breakdown(breakdowns, title="7B")
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    assert len(ax.containers) == 5  # one stacked layer per component
    assert all(len(container) == len(breakdowns) for container in ax.containers)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(breakdowns)
    assert "GiB" in ax.get_ylabel() and ax.get_xlabel()
    assert ax.get_title() == "7B"
    assert ax.get_legend() is not None
    totals = [t.get_text() for t in ax.texts]
    assert totals == [f"{b.total_gib:.1f} GiB" for b in breakdowns.values()]
    with_gpu = memory.plot_memory_breakdown(breakdowns, "7B", gpu_gib=15.0, gpu_name="a T4").axes[0]
    (line,) = with_gpu.get_lines()
    assert list(line.get_ydata()) == [15.0, 15.0] and line.get_label() == "a T4"
    assert "a T4" in [t.get_text() for t in with_gpu.get_legend().get_texts()]


def test_seed_claims_verdicts_are_computed():
    rows = memory.seed_claims()
    assert {"claim", "computed", "verdict", "settings"} <= set(rows[0])
    by_claim = {r["claim"]: r for r in rows}
    full7 = by_claim["full fine-tuning of a 7B needs 40-60 GB"]
    assert full7["computed"] > 60 and full7["verdict"].startswith("claim too low")
    full65 = by_claim["full fine-tuning of a 65B needs about 780 GB"]
    assert full65["computed"] > 1000
    assert full65["claim_bytes_per_param"] == pytest.approx(12, abs=0.2)
    assert by_claim["QLoRA on a 7B needs about 5-7 GB"]["verdict"].startswith("consistent")
    # A different tolerance changes verdicts: they are not hard-coded.
    strict = {r["claim"]: r["verdict"] for r in memory.seed_claims(tolerance=0.0)}
    eight_bit = "LoRA on an 8-bit 7B needs about 10 GB"
    assert by_claim[eight_bit]["verdict"].startswith("consistent") and strict[eight_bit].startswith("claim too low")


def test_the_long_context_estimate_matches_the_runs_measured_on_the_gpu(c7):
    # benchmarks/bench_memory.py --longest: 7B QLoRA under the T4 proxy, one sample per step, up to 81,920 tokens,
    # with and without the 16-bit stream (fp32_norms=False), offloading and tiling: the estimate must follow them.
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "memory_longest.json"
    data = json.loads(results.read_text())
    # The estimate counts LoRA dropout's copies, except in tiled layers (fitted with dropout 0, as they are run).
    points = [
        p for p in data["points"]
        if p.get("peak_allocated_gib") and not p.get("tile_mlp") and ("dropout" not in p or p.get("tile"))
    ]  # fmt: skip
    assert {(p["stream16"], p["offload"], bool(p.get("tile"))) for p in points} >= {
        (False, False, False), (True, False, False), (True, True, False), (True, True, True)
    }  # fmt: skip
    for p in points:
        b = memory.memory_breakdown(
            c7, "qlora", r=p["r"], micro_batch=p["mb"], seq_len=p["seq"], optimizer="paged_adamw_32bit",
            precision="fp16", fp32_norms=not p["stream16"], offload_activations=p["offload"],
            tile_layers=bool(p.get("tile")),
        )  # fmt: skip
        error = (b.total_gib - p["peak_allocated_gib"]) / p["peak_allocated_gib"]
        assert -0.05 <= error <= 0.10, (p, b.total_gib)


def test_offloading_and_tiling_shrink_the_estimate_of_a_long_sample(c7):
    shape = dict(r=64, micro_batch=1, seq_len=49152, optimizer="paged_adamw_32bit", precision="fp16", fp32_norms=False)
    plain = memory.memory_breakdown(c7, "qlora", **shape)
    offloaded = memory.memory_breakdown(c7, "qlora", **shape, offload_activations=True)
    tiled = memory.memory_breakdown(c7, "qlora", **shape, offload_activations=True, tile_layers=True)
    inputs = 49152 * (c7.num_hidden_layers - 1) * c7.hidden_size * 2  # all block inputs but one leave the GPU
    assert (plain.activations - offloaded.activations) * 2**30 == pytest.approx(inputs, rel=1e-6)
    assert tiled.total_gib < 14.5 * 0.8 < offloaded.total_gib  # what lets 49,152 tokens train under a T4's cap
    assert tiled.settings["tile_layers"] and not plain.settings["offload_activations"]


def test_16bit_norms_halve_the_kept_residual_stream_of_a_quantized_model(c7):
    shape = dict(r=64, micro_batch=1, seq_len=16384, precision="fp16")
    fp32, fp16 = (memory.memory_breakdown(c7, "qlora", **shape, fp32_norms=keep) for keep in (True, False))
    kept = 16384 * c7.num_hidden_layers * c7.hidden_size * 2  # the block inputs, 2 bytes fewer each
    assert (fp32.activations - fp16.activations) * 2**30 == pytest.approx(kept, rel=1e-6)
    assert fp16.settings["fp32_norms"] is False
    # a 16-bit base has no fp32 stream to give up
    lora = [memory.memory_breakdown(c7, "lora", **shape, fp32_norms=keep).total_gib for keep in (True, False)]
    assert lora[0] == lora[1]
