import contextlib

import pytest
import torch
from torch import nn

from lora_kit import (
    LoraSettings,
    TrainSettings,
    add_lora,
    build_trainer,
    demo_task,
    find_target_modules,
    load_model,
    preset,
)
from lora_kit import distributed
from lora_kit.data import tokenize_conversations
from lora_kit.errors import LoraKitError
from lora_kit.evaluate import perplexity
from lora_kit.train import Levers, plot_loss

ALL_SEVEN = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def base():
    return load_model("embedded")


def test_presets_are_the_notebooks_recipes():
    from lora_kit.config import T4, recipe

    lora, qlora = preset("lora"), preset("qlora")
    assert (lora.lora.r, lora.lora.alpha, lora.lora.dropout, lora.train.learning_rate) == (16, 32, 0.05, 1e-4)
    assert (qlora.lora.r, qlora.lora.alpha, qlora.lora.dropout, qlora.train.learning_rate) == (64, 16, 0.1, 2e-4)
    assert (qlora.train.optim, qlora.quantization, lora.quantization) == ("paged_adamw_32bit", "nf4", "none")
    for method in ("lora", "lora8", "qlora"):  # one table: what the notebooks and configs/*-t4.yaml run
        notebook = recipe(method, hardware=T4)
        assert (preset(method).lora, preset(method).train) == (notebook.lora, notebook.train)
    assert preset("lora8").quantization == "8bit"
    with pytest.raises(LoraKitError, match="dora"):
        preset("dora")


def test_target_modules_found_on_the_live_model(base):
    model, _ = base
    assert find_target_modules(model) == ALL_SEVEN
    assert find_target_modules(model, "attention") == ["q_proj", "v_proj"]
    with pytest.raises(LoraKitError, match=r"c_attn.*q_proj"):
        find_target_modules(model, ["c_attn"])


def test_target_modules_found_on_a_4bit_model():
    model, _ = load_model("embedded", "nf4")
    assert find_target_modules(model) == ALL_SEVEN


@pytest.mark.parametrize(
    "kwargs,match",
    [({"r": 0}, "rank"), ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"), ({"bias": "some"}, "bias")],
)
def test_contradictory_lora_settings_raise(kwargs, match):
    with pytest.raises(LoraKitError, match=match):
        LoraSettings(**kwargs)


def test_activation_offloading_is_asked_of_trl_only_on_a_gpu():
    from lora_kit.train import sft_config

    with pytest.raises(LoraKitError, match="offload_activations"):
        TrainSettings(offload_activations="yes")
    config = sft_config(TrainSettings(offload_activations=True, report_to="none"), "fp32", False)
    assert config.activation_offloading is False  # this machine has no CUDA: nothing to copy to


def test_fsdp_trains_with_an_optimizer_whose_checkpoint_it_can_load(monkeypatch, capsys):
    from lora_kit.train import sft_config

    # bitsandbytes nests its optimizer states in a dict, which FSDP saves but cannot load back: no resume.
    assert sft_config(TrainSettings(optim="adamw_bnb_8bit", report_to="none"), "fp32", False).optim == "adamw_bnb_8bit"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(distributed, "processes", lambda: 2)  # launched: this machine has no GPU to shard over
    for optim in ("paged_adamw_32bit", "adamw_bnb_8bit", "adamw_torch"):
        assert sft_config(TrainSettings(optim=optim, report_to="none"), "fp32", False).optim == "adamw_torch"
    assert "adamw_torch instead of adamw_bnb_8bit under FSDP" in capsys.readouterr().out


def test_trainable_parameters_follow_r_and_targets(base):
    model, _ = base
    counts = {}
    for r, targets in [(8, "attention"), (16, "all-linear")]:
        peft_model = add_lora(model, LoraSettings(r=r, target_modules=targets))
        counts[(r, targets)] = peft_model.get_nb_trainable_parameters()[0]
        peft_model.unload()  # remove the adapters again, leaving the base as it was
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    qv = (
        cfg.num_hidden_layers
        * 8
        * ((cfg.hidden_size + cfg.hidden_size) + (cfg.hidden_size + cfg.num_key_value_heads * hd))
    )
    assert counts[(8, "attention")] == qv
    assert counts[(16, "all-linear")] > 4 * counts[(8, "attention")]


@pytest.mark.parametrize("fast", [False, True])
def test_a_few_steps_lower_the_loss(tmp_path, fast):
    model, tok = load_model("embedded")
    train_ds, _ = demo_task(64, 2)
    probe, _ = tokenize_conversations(train_ds.select(range(8)), tok, 128)
    before = perplexity(model, probe)
    settings = TrainSettings(
        max_steps=5,
        micro_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        max_length=128,
        gradient_checkpointing=False,
        report_to="none",
        output_dir=str(tmp_path),
        save_steps=1000,
        fast=fast,
    )
    trainer = build_trainer(model, tok, train_ds, lora=LoraSettings(r=8, alpha=16, dropout=0.0), train=settings)
    trainer.train()
    after = perplexity(trainer.model, probe)
    assert after < 0.8 * before, (before, after)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and losses[-1] < losses[0]


def test_quantized_adapters_are_fp32_after_the_trainer_is_built(tmp_path):
    # TRL casts a quantized model's adapters to bf16 while building the trainer; fp16 runs then die in the grad scaler.
    model, tok = load_model("embedded", "nf4")
    train_ds, _ = demo_task(8, 2)
    trainer = build_trainer(
        model,
        tok,
        train_ds,
        lora=LoraSettings(r=8),
        train=TrainSettings(max_steps=1, report_to="none", output_dir=str(tmp_path), max_length=128),
    )
    dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}


def test_plot_loss_draws_the_learning_rate_beside_the_loss():
    from types import SimpleNamespace

    log = [
        {"step": 1, "loss": 2.0, "learning_rate": 0.0},
        {"step": 2, "loss": 1.5, "learning_rate": 1e-3},
        {"step": 3, "loss": 1.0, "learning_rate": 5e-4},
        {"train_runtime": 1.0, "step": 3},
    ]
    fig = plot_loss(SimpleNamespace(state=SimpleNamespace(log_history=log)))
    loss_ax, lr_ax = fig.axes
    assert list(loss_ax.lines[0].get_ydata()) == [2.0, 1.5, 1.0]
    assert list(lr_ax.lines[0].get_xdata()) == [1, 2, 3] and list(lr_ax.lines[0].get_ydata()) == [0.0, 1e-3, 5e-4]
    assert "learning rate" in lr_ax.get_ylabel()
    no_rate = plot_loss(SimpleNamespace(state=SimpleNamespace(log_history=[{"step": 1, "loss": 2.0}])))
    assert len(no_rate.axes) == 1  # an old log without rates still plots its loss


def test_fast_false_means_every_lever_off():
    assert TrainSettings(fast=False).chosen_levers == Levers.off()
    assert TrainSettings().chosen_levers == Levers()  # the machine decides each
    assert TrainSettings(levers=Levers(packing=False)).chosen_levers == Levers(packing=False)
    with pytest.raises(LoraKitError, match="fast=False switches every lever off"):
        TrainSettings(fast=False, levers=Levers(packing=True))
    with pytest.raises(LoraKitError, match="Levers"):
        TrainSettings(levers={"packing": False})


def _losses(tmp_path, **settings):
    model, tok = load_model("embedded")
    train_ds, _ = demo_task(16, 2)
    train = TrainSettings(
        max_steps=3,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        max_length=128,
        gradient_checkpointing=False,
        report_to="none",
        output_dir=str(tmp_path),
        save_steps=1000,
        **settings,
    )
    trainer = build_trainer(model, tok, train_ds, lora=LoraSettings(r=8, alpha=16, dropout=0.0), train=train)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_levers_off_trains_exactly_like_fast_false(tmp_path):
    stock = _losses(tmp_path / "stock", fast=False)
    assert _losses(tmp_path / "off", levers=Levers.off()) == stock
    assert len(stock) == 3


def test_levers_forced_on_the_cpu(tmp_path, capsys):
    model, tok = load_model("embedded")
    train_ds, _ = demo_task(16, 2)
    train = TrainSettings(
        max_steps=1,
        micro_batch_size=2,
        gradient_accumulation_steps=4,
        max_length=128,
        report_to="none",
        output_dir=str(tmp_path),
        levers=Levers(packing=True, liger=True),
    )
    trainer = build_trainer(model, tok, train_ds, lora=LoraSettings(r=8), train=train)
    # packing runs anywhere: packed rows of max_length, accumulation folded; Liger is Triton: it steps aside
    assert trainer.args.packing and trainer.args.gradient_accumulation_steps == 1
    assert not trainer.args.use_liger_kernel
    out = capsys.readouterr().out
    assert "liger: asked for, but it is Triton code" in out and "Speed levers on: packing" in out


def test_tiled_layers_give_the_untiled_loss_and_gradients_and_the_mlp_runs_twice_per_step():
    """Under gradient checkpointing a tiled MLP runs in the forward and in its backward, not in the layer's recompute,
    except where a norm after the MLP (post_feedforward_layernorm) reads its output; loss and gradients are the
    untiled ones. 128 tokens in tiles of 48 (the last one shorter); dropout 0, as tiles draw their masks in pieces."""
    from lora_kit.train import tile_layers

    ids = torch.randint(0, 49152, (2, 128), generator=torch.Generator().manual_seed(0))

    def run(tile, norm_after_mlp=False):
        model, _ = load_model("embedded")
        torch.manual_seed(1)  # the same random lora_A in every model
        model = add_lora(model, LoraSettings(r=8, dropout=0.0))
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        layer = model.base_model.model.model.layers[0]
        tiles = []
        mlp_forward = layer.mlp.forward
        layer.mlp.forward = lambda x: tiles.append(x.shape[-2]) or mlp_forward(x)
        if norm_after_mlp:  # the Gemma 2 / OLMo 2 shape: the layer norms the MLP's output before the residual add
            layer.post_feedforward_layernorm = nn.LayerNorm(model.config.hidden_size)
        if tile:
            layers = model.config.num_hidden_layers
            assert tile_layers(model, tokens=tile) == (layers, 2 * layers + 1 + norm_after_mlp)  # and the final norm
        if norm_after_mlp:
            layer.mlp.forward = lambda x, mlp=layer.mlp.forward: layer.post_feedforward_layernorm(mlp(x))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), tiles, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    def assert_same(tiled, untiled):
        assert tiled[0] == pytest.approx(untiled[0], rel=1e-5)
        assert tiled[2].keys() == untiled[2].keys()
        for name, grad in untiled[2].items():
            torch.testing.assert_close(tiled[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    untiled, tiled = run(None), run(48)
    assert untiled[1] == [128, 128]  # forward, then the layer's recompute
    assert tiled[1] == [48, 48, 32] * 2  # forward, then each tile again in the MLP's backward: no recompute
    assert_same(tiled, untiled)
    normed_untiled, normed = run(None, norm_after_mlp=True), run(48, norm_after_mlp=True)
    assert normed[1] == [48, 48, 32] * 3  # the recompute gives the norm the MLP's real output
    assert_same(normed, normed_untiled)


def test_a_tiled_4bit_mlp_dequantizes_each_weight_once_per_pass_and_trains_as_bitsandbytes_does(monkeypatch):
    """bitsandbytes dequantizes a 4-bit weight at every call; a tiled MLP's tiles share one dequantized copy per pass
    and multiply by it as plain matrices, so its 4-bit weights go through no bitsandbytes matmul, with the same
    numbers as when every tile does."""
    import bitsandbytes

    import lora_kit.train as train_module

    ids = torch.randint(0, 49152, (1, 96), generator=torch.Generator().manual_seed(0))
    calls, share = [], {"on": True}
    matmul, once = bitsandbytes.matmul_4bit, train_module._dequantized_once
    monkeypatch.setattr(bitsandbytes, "matmul_4bit", lambda *a, **k: calls.append(1) or matmul(*a, **k))
    # switched off, each tile's layers dequantize for themselves, as bitsandbytes does
    monkeypatch.setattr(
        train_module, "_dequantized_once", lambda f: once(f) if share["on"] else contextlib.nullcontext()
    )

    def run(shared):
        model, _ = load_model("embedded", "nf4")
        torch.manual_seed(1)
        model = add_lora(model, LoraSettings(r=8, dropout=0.0))
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        train_module.tile_layers(model, tokens=32)  # 3 tiles
        share["on"] = shared
        calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        loss = model(input_ids=ids, labels=ids).loss.item()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss, len(calls), grads, model.config.num_hidden_layers

    shared, per_call = run(True), run(False)
    layers = shared[3]
    # 4 attention weights in the forward, the layer's recompute and the second forward; the 3 MLP weights, shared,
    # in none, else in each of 3 tiles in the forward, the MLP's backward and the second forward
    assert shared[1] == layers * 4 * 3
    assert per_call[1] == layers * (4 * 3 + 3 * 3 * 3)
    assert shared[0] == pytest.approx(per_call[0], rel=1e-6)
    for name, grad in per_call[2].items():
        torch.testing.assert_close(shared[2][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_tiled_mlp_redoes_its_tiles_with_the_forward_passes_dropout_and_autocast():
    """The MLP's backward redoes each tile as its forward did: the same dropout masks (so the gradients equal a
    checkpoint's per tile) and the same autocast (16-bit matrix products under mixed precision)."""
    from lora_kit.train import _tiled

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 8))
    x = torch.randn(2, 30, 8)
    weights = torch.linspace(-1, 1, 8)

    def grads(checkpointed):
        torch.manual_seed(1)
        mlp.zero_grad()
        part = x.clone().requires_grad_()
        (_tiled(mlp.forward, 7, checkpointed, params=mlp.parameters)(part) * weights).sum().backward()
        return [part.grad, *(p.grad for p in mlp.parameters())]

    for mine, checkpoints in zip(grads(checkpointed=False), grads(checkpointed=True)):
        torch.testing.assert_close(mine, checkpoints, rtol=1e-5, atol=1e-6)

    # Autocast as in the forward pass, and the run's own saved-tensor hooks (activation offloading keeps them on
    # through the backward pass) never see the tiles redone there.
    dtypes, packed = [], []
    mlp[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    part = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _tiled(mlp.forward, 7, checkpointed=False, params=mlp.parameters)(part)
        loss = (out.float() * weights).sum()
        in_forward = len(packed)
        loss.backward()
    assert dtypes == [torch.bfloat16] * 2 * 5  # 5 tiles of 30 tokens, in the forward and again in the backward
    assert in_forward > 0 and len(packed) == in_forward


def test_a_tiled_mlp_gives_each_parameter_its_gradient_once_per_backward_pass():
    """DistributedDataParallel marks a parameter ready each time its gradient is accumulated, and refuses a second."""
    from lora_kit.train import _tiled

    mlp = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 8))
    mlp[0].bias.requires_grad_(False)  # a frozen parameter gets no gradient
    accumulated = []
    for param in mlp.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.shape))
    x = torch.randn(1, 30, 8, requires_grad=True)
    _tiled(mlp.forward, 7, checkpointed=False, params=mlp.parameters)(x).sum().backward()
    assert sorted(accumulated) == sorted(p.shape for p in mlp.parameters() if p.requires_grad)  # 5 tiles, once each
    assert mlp[0].bias.grad is None and x.grad is not None


def test_build_trainer_tiles_the_layers_when_asked(tmp_path, capsys):
    model, tok = load_model("embedded")
    train_ds, _ = demo_task(8, 2)
    train = TrainSettings(max_steps=1, max_length=128, report_to="none", output_dir=str(tmp_path), tile_layers=True)
    trainer = build_trainer(model, tok, train_ds, lora=LoraSettings(r=8), train=train)
    tiled = [m for m in trainer.model.modules() if getattr(m, "_lora_kit_tiled", False)]
    assert len(tiled) == 3 * model.config.num_hidden_layers + 1
    assert "Tiled layers: 30 MLPs and 61 norms computed in tiles of 576 tokens" in capsys.readouterr().out
    with pytest.raises(LoraKitError, match="tile_layers"):
        TrainSettings(tile_layers="yes")


def test_tiled_layers_name_an_mlp_whose_tiles_cannot_be_joined():
    from lora_kit.train import _tiled

    def router_mlp(x):  # a mixture of experts' block: hidden states and the router's logits
        return x, x.sum(-1)

    with pytest.raises(LoraKitError, match="returns a tuple, not one tensor.*tile_layers=False"):
        _tiled(router_mlp, 4)(torch.ones(1, 10, 3))
    assert _tiled(router_mlp, 16)(torch.ones(1, 10, 3))[0].shape == (1, 10, 3)  # one tile: the module's own output
