"""Tests for lora_kit.quant: the NF4 levels and measured quantization error."""

import logging

import matplotlib
import pytest
import torch

from lora_kit import quant
from lora_kit.errors import LoraKitError


def test_nf4_has_16_sorted_levels_with_exact_zero_and_unit_endpoints():
    levels = quant.nf4_levels()
    assert levels.shape == (16,)
    assert torch.all(levels[1:] > levels[:-1])
    assert levels[0].item() == -1.0 and levels[-1].item() == 1.0
    assert (levels == 0).sum().item() == 1
    assert (levels < 0).sum().item() == 7 and (levels > 0).sum().item() == 8


# The NF4 table as published in the QLoRA paper (Dettmers et al., 2023, appendix E).
NF4_PAPER_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635]
NF4_PAPER_TABLE += [-0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725]
NF4_PAPER_TABLE += [0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941]
NF4_PAPER_TABLE += [0.7229568362236023, 1.0]


def test_nf4_matches_the_published_table_and_the_normal_quantile_construction():
    levels = quant.nf4_levels()
    assert torch.allclose(levels, torch.tensor(NF4_PAPER_TABLE), atol=1e-6)
    assert torch.allclose(quant.normal_quantile_levels(16), levels, atol=1e-5)


def test_normal_quantile_levels_other_sizes():
    levels = quant.normal_quantile_levels(8)
    assert levels.shape == (8,) and levels.min() == -1 and levels.max() == 1 and (levels == 0).any()
    with pytest.raises(LoraKitError):
        quant.normal_quantile_levels(7)


def test_fp4_and_int4_grids():
    fp4 = quant.fp4_levels()
    assert fp4.shape == (16,) and fp4.min() == -1 and fp4.max() == 1
    assert len(torch.unique(fp4)) == 15  # +0 and -0
    int4 = quant.int4_levels()
    assert torch.allclose(int4[1:] - int4[:-1], torch.full((15,), 2 / 15))
    assert torch.allclose(int4, -int4.flip(0))


def test_bits_per_parameter():
    assert quant.bits_per_parameter(double_quant=False) == 4.5
    assert quant.bits_per_parameter() == pytest.approx(4.127, abs=1e-3)
    assert quant.bits_per_parameter() == 4 + 8 / 64 + 32 / (64 * 256)
    assert quant.bits_per_parameter(blocksize=128, double_quant=False) == 4.25


def test_own_nf4_round_trip_reproduces_bitsandbytes():
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    for quant_type, levels in (("nf4", quant.nf4_levels()), ("fp4", quant.fp4_levels())):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        theirs = F.dequantize_4bit(packed, state)
        ours = quant.quantize_to_levels(w, levels, blocksize=64)
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_quantization_error_is_right_when_rows_are_not_whole_blocks():
    # 96 is not a multiple of 64: bitsandbytes 0.50.2's CPU dequantize_4bit gets such 2-D
    # shapes wrong, so quantization_error goes through a flat view. Check it against our own NF4.
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    ours = quant.quantize_to_levels(w, quant.nf4_levels(), blocksize=64)
    expected = ((w - ours).norm() / w.norm()).item()
    assert quant.quantization_error(w)["nf4"]["relative_rms_error"] == pytest.approx(expected, rel=1e-5)


def test_quantize_to_levels_handles_a_ragged_last_block():
    w = torch.tensor([0.5, -1.0, 0.25, 2.0, 0.0])
    q = quant.quantize_to_levels(w, quant.int4_levels(), blocksize=4)
    assert q.shape == w.shape
    assert q[3].item() == 2.0  # the block's absmax is exact
    assert q[1].item() == pytest.approx(-2 * 7 / 15)  # -0.5 of absmax -> nearest level -7/15
    assert q[4].item() == 0.0  # the last block is [0.0] (padded): an all-zero block stays zero


def test_nf4_beats_fp4_and_int4_on_a_normal_matrix():
    torch.manual_seed(0)
    w = torch.randn(256, 256) * 0.02
    errors = quant.quantization_error(w)
    assert set(errors) == {"nf4", "fp4", "int4"}
    for metric in ("mean_abs_error", "relative_rms_error"):
        assert errors["nf4"][metric] < errors["int4"][metric] < errors["fp4"][metric]
    # 4 bits leave an error near a tenth of the weights' size.
    assert 0.05 < errors["nf4"]["relative_rms_error"] < 0.15


def test_quantization_error_rejects_packed_weights():
    with pytest.raises(LoraKitError, match="quantized"):
        quant.quantization_error(torch.zeros(64, dtype=torch.uint8))


def test_plot_nf4_levels_has_labelled_axes():
    fig = quant.plot_nf4_levels()
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("NF4" in s for s in labels) and any("int4" in s for s in labels)
    assert len(ax.lines[1].get_ydata()) == 16


def _int8_layer(weight):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    layer.train()
    layer(torch.randn(2, weight.shape[1]))  # the first call quantizes the weight
    return layer


def test_lean_int8_backward_keeps_gradients_and_lets_go_of_inputs():
    import gc
    import weakref

    from lora_kit.quant import lean_int8_backward

    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.05
    stock, lean = _int8_layer(weight), _int8_layer(weight)
    assert lean_int8_backward(torch.nn.Sequential(lean)) == 1
    x = torch.randn(3, 5, 64, requires_grad=True)
    grad = torch.randn(3, 5, 96)
    grads = []
    for layer in (stock, lean):
        y = layer(x)
        y.backward(grad)
        grads.append((y.detach(), x.grad.clone()))
        x.grad = None
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    # The input of a layer inside the graph: bitsandbytes keeps it alive, the lean path does not.
    alive = []
    for layer in (stock, lean):
        h = x * 2
        ref = weakref.ref(h)
        out = layer(h)
        del h
        gc.collect()
        alive.append(ref() is not None)
        del out
    assert alive == [True, False]


@pytest.mark.parametrize("double_quant", [True, False])
def test_torch_4bit_matmul_has_bitsandbytes_values_when_compiled_and_leaves_eager_calls_alone(double_quant):
    import copy

    import bitsandbytes as bnb

    torch.manual_seed(0)
    stock = bnb.nn.Linear4bit(256, 192, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    stock.load_state_dict(torch.nn.Linear(256, 192).state_dict())
    stock = stock.to("cpu").requires_grad_(False)
    ours = copy.deepcopy(stock)
    assert quant.torch_4bit_matmul(torch.nn.Sequential(ours, torch.nn.Linear(3, 3))) == 1
    # the weight decoded in torch operations: bitsandbytes' values, bit for bit, and one rounding to 16 bits
    tensors, sizes = quant._4bit_parts(stock.weight)
    weight = quant.dequantize_4bit_weight(stock.weight)
    for dtype in (torch.float32, torch.bfloat16):
        decoded = quant._dequantize_4bit(*tensors, *sizes, stock.weight.quant_state.shape, dtype)
        assert torch.equal(decoded, weight.to(dtype))
    x = torch.randn(2, 7, 256, requires_grad=True)
    grad = torch.randn(2, 7, 192)
    # eager: bitsandbytes' own path, the same bits
    assert torch.equal(ours(x), stock(x))
    # compiled: y = x W^T + b, and x's gradient through W, with no bitsandbytes op left in the traced code
    traced = []

    def backend(graph_module, example_inputs):
        traced.extend(str(n.target) for m in graph_module.modules() if hasattr(m, "graph") for n in m.graph.nodes)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda gm, _: gm)(graph_module, example_inputs)

    y = torch.compile(ours, backend=backend)(x)
    y.backward(grad)
    assert traced and not [t for t in traced if "bitsandbytes" in t]
    assert [t for t in traced if "autograd_function_apply" in t or "FrozenTorch4bit" in t]
    assert torch.allclose(y, x @ weight.T + stock.bias, atol=1e-5)
    assert torch.allclose(x.grad, grad @ weight, atol=1e-5)


def test_load_model_8bit_uses_the_lean_backward():
    from lora_kit import load_model

    from lora_kit.quant import quantization_of
    from lora_kit.train import LoraSettings, add_lora

    model, _ = load_model("embedded", quantization="8bit")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear8bitLt"]
    assert layers and all(
        getattr(m.forward, "__name__", "") == "forward" and not hasattr(m.forward, "__self__") for m in layers
    )
    assert quantization_of(add_lora(model, LoraSettings(r=4))) == "8bit"


def test_bitsandbytes_per_matmul_cast_message_stays_out_of_the_output(caplog):
    import lora_kit.quant  # noqa: F401  (installs the filter)

    layer = _int8_layer(torch.randn(32, 16) * 0.05).eval()  # a stock layer in inference: fp32 input is cast each call
    caplog.clear()
    with caplog.at_level("WARNING"):
        for _ in range(3):
            layer(torch.randn(2, 16))
        logging.getLogger("bitsandbytes.autograd._functions").warning("another bitsandbytes warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["another bitsandbytes warning"]


def test_patches_of_bitsandbytes_internals_step_aside_on_an_unchecked_release(monkeypatch, caplog):
    import importlib.metadata

    import bitsandbytes as bnb

    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "9.9.0" if name == "bitsandbytes" else real_version(name)
    )
    four_bit = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32).to("cpu").requires_grad_(False)
    eight_bit = _int8_layer(torch.randn(96, 64) * 0.05)
    with caplog.at_level(logging.WARNING, logger="lora_kit.quant"):
        assert quant.torch_4bit_matmul(torch.nn.Sequential(four_bit)) == 0
        assert quant.lean_int8_backward(torch.nn.Sequential(eight_bit)) == 0
    assert "forward" not in vars(four_bit) and "forward" not in vars(eight_bit)  # their own forward stays
    ours = [r.getMessage() for r in caplog.records if r.name == "lora_kit.quant"]
    assert [m.split(":")[0] for m in ours] == ["bitsandbytes 9.9.0"] * 2
    assert "the torch 4-bit matmul was checked on 0.50 only" in ours[0]
