#!/usr/bin/env python3
"""Side-by-side training benchmark: the stock transformers + peft + trl recipe, lora_kit's fast path and Unsloth.

What it measures: a Llama-2-7B-shaped model built from its config with random weights (speed and memory
do not depend on the values; no weights can be downloaded), LoRA or QLoRA (NF4, double quant) r=64 alpha=16
dropout 0 on all 7 projections, trained with TRL's SFTTrainer. For each recipe it reports

    real tokens/s   non-padding input tokens of the timed steps / their wall time
    median step     median optimizer-step time after the warm-up steps (synchronised CUDA clock)
    peak            torch.cuda.max_memory_allocated during training (reset after the trainer is built)

"stock" is the plain transformers + peft + trl recipe: sdpa attention, paged_adamw_32bit, gradient checkpointing,
each batch padded to its longest sequence, constant learning rate. "lora_kit" is stock plus the levers that
`lora_kit.speed` switches on for this machine. Other recipe names switch one lever on at a time (see RECIPES) so
each lever is measured alone. "unsloth" is Unsloth's own recipe (FastLanguageModel, its gradient checkpointing, its
patched SFTTrainer) on the same checkpoint, data, optimizer and steps, with the batch shape lora_kit decides for the
data (the mixed shape packed into seq_len rows), so both see the same real tokens per optimizer step. It runs from its
own site folder (--unsloth-site), because Unsloth pins its own trl and datasets, and is skipped without one, with a
transformers its requirement admits (unsloth_path: on 5.23 its Llama path loses gradient checkpointing).

Every recipe's result also says whether gradient checkpointing really ran ("checkpointing", the table's ckpt column):
the first decoder layer's runs are counted during the first step, recomputes in the backward apart (CheckpointProbe);
OFF! marks a recipe that asked for checkpointing and recomputed nothing.

Two data shapes: "fixed" (every sample seq_len tokens) and "mixed" (log-normal lengths, median ~250 tokens, clipped
to [16, seq_len], seeded: chat-like, mostly short with a long tail).

Run it (GPU, from the repository root):
    python benchmarks/bench_train.py --model-size 7b --method qlora --shapes fixed,mixed --recipes stock,lora_kit
    python benchmarks/bench_train.py --model-size 7b --precision fp16 --max-memory-gib 15 --shapes fixed  # T4 proxy
    python benchmarks/bench_train.py --recipes stock,lora_kit,unsloth --unsloth-site /tmp/usite \
        --vs-unsloth-out benchmarks/results/vs_unsloth.json
CPU smoke run (CI):
    python benchmarks/bench_train.py --model-size tiny --steps 2 --warmup 1

Each recipe runs in its own subprocess on CUDA (clean peak-memory counters; Liger and torch.compile patch modules
globally; Unsloth patches transformers, peft and trl as it is imported). The last line printed is one JSON object with
every result and each recipe's ratios against stock (bf16 base) and against Unsloth.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lora_kit import memory  # noqa: E402  (after the path above)
from lora_kit.hardware import torch_dtype  # noqa: E402

GIB = 2**30
RESULT_TAG = "BENCH_RESULT "
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ---- model shapes ------------------------------------------------------------------------------------------------
MODEL_SIZES = {
    "7b": memory.LLAMA2_7B,  # Llama-2-7B: 6.74 B parameters
    "tiny": memory.decoder_shape(64, 172, 2, 4, 4, 512, tied=False, context=512),  # CPU smoke size, same architecture
}

# ---- recipes: stock + one lever at a time + combinations ---------------------------------------------------------
# Keys: liger (Liger RMSNorm/RoPE/SwiGLU kernels), padding_free (flatten the batch, no pad tokens), packing (TRL bfd
# packing into seq_len bins, padding-free inside), mb_mult (micro-batch multiplier, gradient accumulation divided by
# the same: same samples per optimizer step), gc ("full" | "selective" | "off"), offload (TRL activation offloading
# to CPU), compile (Trainer torch_compile), fast (take every setting from lora_kit.speed; "levers" forces some of
# lora_kit.speed.Levers' fields over what this machine decides, "whole_layers" compiles decoder layers whole instead).
RECIPES = {
    "stock": {},
    # stock with the unquantized modules (embeddings, lm_head, norms) in fp32: what from_pretrained gives when no dtype
    # is passed (the Llama-2 QLoRA Colab tutorial's code) and the checkpoint was saved in fp32 (LlamaForCausalLM(config)
    # builds fp32), or on transformers 4.x whatever the checkpoint. Compute stays bf16/fp16 (bnb_4bit_compute_dtype +
    # autocast).
    "stock_fp32base": {"base_dtype": "fp32"},
    "liger": {"liger": True},
    "padfree": {"padding_free": True},
    "padfree_mb4x": {"padding_free": True, "mb_mult": 4},
    "packing": {"packing": True, "ga": 1},
    "packing_flex": {"packing": True, "ga": 1, "attn": "flex_attention"},
    "flex": {"attn": "flex_attention"},
    "sac": {"gc": "selective"},  # TRL 1.16 + transformers 5.23: "Unexpected keyword arguments: selective"
    "offload": {"offload": True},
    "nogc": {"gc": "off"},
    "mb2x": {"mb_mult": 2},
    "compile": {"compile": True},
    "liger_offload": {"liger": True, "offload": True},
    "padfree_mb4x_liger": {"padding_free": True, "mb_mult": 4, "liger": True},
    "padfree_mb4x_flex": {"padding_free": True, "mb_mult": 4, "attn": "flex_attention"},
    "compile_liger": {"compile": True, "liger": True},
    # torch.compile of each decoder layer's attention and MLP blocks (gradient checkpointing kept, outside them)
    "compile_layers": {"compile_layers": True},
    "compile_layers_liger": {"compile_layers": True, "liger": True},
    # the adapters cast back to fp32 after the trainer is built (TRL casts a quantized model's adapters to bf16)
    "fp32_adapters": {"fp32_adapters": True},
    "lora_kit": {"fast": True},
    # lora_kit with one of its post-build levers switched off, to see what each gives inside the whole path
    "lora_kit_nocompile": {"fast": True, "levers": {"compile_blocks": False}},
    "lora_kit_nosync": {"fast": True, "levers": {"one_sync_optimizer": False}},
    "lora_kit_nolean": {"fast": True, "levers": {"lean_update": False}},
    # lora_kit with each frozen 4-bit weight decoded by torch operations inside the compiled blocks
    "lora_kit_torch4bit": {"fast": True, "levers": {"torch_4bit_matmul": True}},
    # lora_kit without Liger's kernels: torch's fused RMSNorm for the norms, Inductor's SwiGLU in the compiled blocks
    "lora_kit_noliger": {"fast": True, "levers": {"liger": False}},
    # experiments: whole decoder layers compiled where lora_kit compiles blocks (norms and residual adds inside the
    # compiled code, one compiled region per layer instead of two), with and without Liger's kernels
    "lora_kit_layers": {"fast": True, "levers": {"compile_blocks": False}, "whole_layers": True},
    "lora_kit_layers_noliger": {
        "fast": True,
        "levers": {"compile_blocks": False, "liger": False},
        "whole_layers": True,
    },
    # lora_kit with Liger's RoPE kernel back inside the compiled attention blocks
    "lora_kit_ligerrope": {"fast": True, "levers": {"liger_rope": True}},
    # lora_kit with TrainSettings.offload_activations: each checkpointed layer's input kept in CPU RAM (TRL's
    # activation offloading), as Unsloth's own gradient checkpointing does
    "lora_kit_offload": {"fast": True, "offload": True},
    # lora_kit with Inductor's pointwise autotuning back on (torch's default; Levers.autotune_pointwise)
    "lora_kit_pwautotune": {"fast": True, "levers": {"autotune_pointwise": True}},
    # Unsloth's recipe (FastLanguageModel + its SFTTrainer), in a subprocess with its own site folder first on the path
    "unsloth": {"unsloth": True},
    # the stock recipe + only the one-sync-per-step optimizer
    "onesync": {"onesync": True},
    # ... + the bnb update op called straight from the parameter group (speed.lean_update_step)
    "onesync_lean": {"onesync": True, "lean": True},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="7b")
    p.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    p.add_argument("--seq-len", type=int, default=None, help="fixed length / longest mixed sample (7b: 2048)")
    p.add_argument("--micro-batch", type=int, default=2, help="stock micro-batch of the fixed shape")
    p.add_argument("--mixed-micro-batch", type=int, default=4, help="stock micro-batch of the mixed shape")
    p.add_argument("--grad-accum", type=int, default=1, help="stock gradient accumulation, fixed shape")
    p.add_argument("--mixed-grad-accum", type=int, default=4, help="stock gradient accumulation, mixed shape")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="auto: bf16 on compute capability >= 8.0, fp16 below (T4), fp32 on CPU",
    )
    p.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction): T4 proxy = 15",
    )
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per recipe")
    p.add_argument("--warmup", type=int, default=4, help="untimed optimizer steps first")
    p.add_argument("--shapes", default="fixed,mixed")
    p.add_argument(
        "--recipes", default="stock_fp32base,stock,lora_kit,unsloth", help=f"comma list from {sorted(RECIPES)}"
    )
    p.add_argument(
        "--unsloth-site",
        default=os.environ.get("UNSLOTH_SITE"),
        help="folder Unsloth and its own trl and datasets are installed in (pip install --target DIR), put first on "
        "the unsloth recipe's PYTHONPATH only. Default: $UNSLOTH_SITE; without either the unsloth recipe is skipped",
    )
    p.add_argument(
        "--unsloth-transformers",
        choices=["supported", "path"],
        default="supported",
        help="supported (default): the unsloth recipe imports the first transformers on its path that Unsloth's "
        "requirement admits, a PYTHONPATH folder whose transformers it does not admit being replaced on that "
        "recipe's path by a view without it (so the interpreter's own can serve); path: whatever comes first",
    )
    p.add_argument(
        "--vs-unsloth-out",
        default=None,
        help="also write the lora_kit / Unsloth summary here (speed and memory ratio per shape, both runs' figures)",
    )
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--ckpt-dir", default=None, help="where the random checkpoint is saved (reused if present)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run recipes in this process (default on CPU; on CUDA each recipe gets a subprocess)",
    )
    p.add_argument(
        "--cold-compile",
        action="store_true",
        help="give each recipe subprocess empty Inductor and Triton caches, as on a fresh machine (a new "
        "Colab runtime): compilation and kernel autotuning then happen inside the timed run. Applies to "
        "recipe subprocesses (the CUDA default), not to --in-process runs",
    )
    p.add_argument("--recipe-timeout", type=int, default=900, help="seconds per recipe subprocess")
    p.add_argument("--json-out", default=None, help="also write the JSON result here")
    p.add_argument(
        "--profile-dir",
        default=None,
        help="profile 2 optimizer steps after the warm-up (torch.profiler) and write a table per recipe here",
    )
    p.add_argument(
        "--memory-report",
        action="store_true",
        help="record every CUDA allocation while training (slows the steps: not for timing) and report what "
        "was alive at the peak, grouped by the code that allocated it",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--emulate-capability",
        default=None,
        help="compute capability lora_kit.speed decides for, e.g. 7.5 for the T4 proxy on a big GPU",
    )
    # internal: one recipe in a worker subprocess
    p.add_argument("--worker", nargs=2, metavar=("SHAPE", "RECIPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seq_len is None:
        args.seq_len = 2048 if args.model_size == "7b" else 128
    return args


# ---- environment -------------------------------------------------------------------------------------------------
def device_info():
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "device": "cuda",
            "name": props.name,
            "capability": list(torch.cuda.get_device_capability(0)),
            "total_gib": round(props.total_memory / GIB, 2),
        }
    return {"device": "cpu", "name": "cpu", "capability": None, "total_gib": None}


def resolve_precision(args, info):
    if args.precision != "auto":
        return args.precision
    if info["device"] == "cpu":
        return "fp32"
    return "bf16" if tuple(info["capability"]) >= (8, 0) else "fp16"


def versions(extra=()):
    """Versions of the training stack this process imports (plus the `extra` package names)."""
    import importlib

    out = {"python": sys.version.split()[0]}
    names = ["torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "liger_kernel", *extra]
    for name in names:
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - report what is missing, do not fail the benchmark on it
            try:
                from importlib.metadata import version

                out[name] = version(name.replace("_", "-"))
            except Exception:  # noqa: BLE001
                out[name] = None
    return out


# ---- checkpoint and tokenizer ------------------------------------------------------------------------------------
def build_tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"t{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # text of words "t5 t17 ..." is one token per word
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def ensure_checkpoint(args, dtype_name):
    """Save a random-weight checkpoint once (safetensors) so every recipe loads it the ordinary way."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ckpt = Path(args.ckpt_dir)
    if (ckpt / "config.json").exists() and any(ckpt.glob("*.safetensors")):
        return ckpt, 0.0
    t0 = time.time()
    ckpt.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    cfg = LlamaConfig(
        **MODEL_SIZES[args.model_size],
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in 16 bits: a 7B in fp32 would need 27 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(ckpt)
    build_tokenizer(cfg.vocab_size).save_pretrained(ckpt)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return ckpt, time.time() - t0


def load_model(args, ckpt, precision, on_cuda, attn="sdpa", base_dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch_dtype(precision)
    kwargs = dict(
        dtype=torch_dtype(base_dtype or precision),
        attn_implementation=attn,
        device_map={"": 0} if on_cuda else {"": "cpu"},
    )
    if args.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float32,
        )
    return AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)


def load_unsloth_model(args, ckpt, precision):
    """The checkpoint as an Unsloth user loads it: FastLanguageModel, NF4 + double quant for QLoRA (Unsloth's own
    BitsAndBytesConfig), the run's precision for the rest. Returns (model, tokenizer)."""
    from unsloth import FastLanguageModel

    return FastLanguageModel.from_pretrained(
        str(ckpt),
        max_seq_length=args.seq_len,
        dtype=torch_dtype(precision),
        load_in_4bit=args.method == "qlora",
        fix_tokenizer=False,  # the samples are token ids already: the tokenizer only gives the pad id
    )


# ---- data --------------------------------------------------------------------------------------------------------
def sample_lengths(shape, n, seq_len, seed):
    import numpy as np

    if shape == "fixed":
        return [seq_len] * n
    rng = np.random.default_rng(seed)
    median = max(8, round(250 * seq_len / 2048))  # 250 at seq_len 2048, scaled for tiny runs
    lengths = np.exp(rng.normal(math.log(median), 1.0, size=n))  # sigma 1: mean ~1.65x median, p99 ~10x
    return [int(x) for x in np.clip(np.round(lengths), 16 if seq_len >= 256 else 4, seq_len)]


def make_dataset(shape, n, seq_len, vocab_size, seed):
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed + 1)
    lengths = sample_lengths(shape, n, seq_len, seed)
    # Token ids from 4 up: never <unk>/<s>/</s>/<pad>, so no label is masked by accident.
    rows = [rng.integers(4, vocab_size, size=length).tolist() for length in lengths]
    return Dataset.from_dict({"input_ids": rows})


# ---- one recipe --------------------------------------------------------------------------------------------------
def fast_capability(args, info):
    """The compute capability lora_kit.speed is told: the real one, or --emulate-capability (T4 proxy: 7.5)."""
    if args.emulate_capability:
        major, minor = args.emulate_capability.split(".")
        return int(major), int(minor)
    return tuple(info["capability"]) if info["capability"] else None


def recipe_settings(args, shape, recipe, info, precision):
    """Turn a recipe's levers into SFTConfig kwargs + micro-batch/accumulation. Returns (cfg_kwargs, mb, ga, levers)."""
    levers = dict(RECIPES[recipe])
    mb = args.micro_batch if shape == "fixed" else args.mixed_micro_batch
    ga = args.grad_accum if shape == "fixed" else args.mixed_grad_accum
    kw = {}
    if levers.get("unsloth"):
        # Unsloth trains the batch shape lora_kit decides for these data: where lora_kit packs (the mixed shape), Unsloth
        # packs too (packing=True in its SFTConfig, bfd into seq_len rows) with as many rows per step, so both see the
        # same real tokens per optimizer step. packing_pays reads the mean fill, which 1,024 of the shape's lengths give.
        from lora_kit import speed

        decided = lora_kit_levers(args, info, precision, sample_lengths(shape, 1024, args.seq_len, args.seed))
        mb, ga = speed.batch_shape(mb, ga, decided)
        kw["_via_unsloth"] = True
        if decided.packing:
            kw.update(packing=True, packing_strategy="bfd")
        return kw, mb, ga, {"unsloth": "FastLanguageModel + its SFTTrainer", "packs_as_lora_kit": decided.packing}
    if levers.pop("fast", False):
        # lora_kit's own entry point decides everything (lora_kit.train.build_trainer with TrainSettings(fast=True))
        kw["_via_lora_kit"] = {
            "forced": levers.get("levers", {}),
            "whole_layers": levers.get("whole_layers", False),
            "offload": levers.get("offload", False),
        }
        levers = {
            "fast": "lora_kit.train.build_trainer",
            "capability_seen": fast_capability(args, info),
            "levers_forced": kw["_via_lora_kit"]["forced"],
            "whole_layers": kw["_via_lora_kit"]["whole_layers"],
            "offload_activations": kw["_via_lora_kit"]["offload"],
        }
    if levers.get("liger"):
        kw["use_liger_kernel"] = True
    if levers.get("padding_free"):
        kw["padding_free"] = True
    if levers.get("packing"):
        kw["packing"] = True
        kw["packing_strategy"] = "bfd"
    if levers.get("ga"):
        ga = levers["ga"]
    if levers.get("attn"):
        kw["_attn"] = levers["attn"]
    if levers.get("base_dtype"):
        kw["_base_dtype"] = levers["base_dtype"]
    if levers.get("mb_mult"):
        m = levers["mb_mult"]
        mb, ga = mb * m, max(1, ga // m)
    gc = levers.get("gc", "full")
    if gc == "off":
        kw["gradient_checkpointing"] = False
    elif gc == "selective":
        kw["gradient_checkpointing_kwargs"] = {"selective": True}
    if levers.get("offload"):
        kw["activation_offloading"] = True
    if levers.get("compile"):
        kw["torch_compile"] = True
    for applied_after_build in (
        "compile_layers",
        "fp32_adapters",
        "onesync",
        "lean",
    ):  # not SFTConfig fields: run_recipe
        if levers.get(applied_after_build):
            kw["_" + applied_after_build] = True
    return kw, mb, ga, levers


def run_recipe(args, shape, recipe, ckpt):
    """Train one recipe for warmup+steps optimizer steps; return a result dict."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    info = device_info()
    on_cuda = info["device"] == "cuda"
    precision = resolve_precision(args, info)
    result = {
        "shape": shape,
        "recipe": recipe,
        "precision": precision,
        "method": args.method,
        "model_size": args.model_size,
        "seq_len": args.seq_len,
        # where this recipe's compiled kernels are cached: a fresh folder per recipe under --cold-compile
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }
    if on_cuda and args.max_memory_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_memory_gib * GIB / total))
        result["max_memory_gib"] = args.max_memory_gib

    cfg_kw, mb, ga, levers = recipe_settings(args, shape, recipe, info, precision)
    attn = cfg_kw.pop("_attn", "sdpa")
    base_dtype = cfg_kw.pop("_base_dtype", None)
    compile_layers = cfg_kw.pop("_compile_layers", False)
    fp32_adapters = cfg_kw.pop("_fp32_adapters", False)
    onesync = cfg_kw.pop("_onesync", False)
    lean = cfg_kw.pop("_lean", False)
    via_lora_kit = cfg_kw.pop("_via_lora_kit", None)
    via_unsloth = cfg_kw.pop("_via_unsloth", False)
    result.update(
        {
            "levers": levers,
            "micro_batch": mb,
            "grad_accum": ga,
            "attn": attn,
            "sft_kwargs": {k: v for k, v in cfg_kw.items()},
        }
    )
    # Profiled steps (if any) come after the timed ones and are not timed: the profiler slows them down.
    total_steps = args.warmup + args.steps + (PROFILE_STEPS if args.profile_dir else 0)
    packing = cfg_kw.get("packing", False)
    padding_free = cfg_kw.get("padding_free", False) or packing
    # Enough samples for every step; packing folds several samples into one bin, so give it more to draw from.
    n_samples = total_steps * mb * ga * (12 if (packing or via_lora_kit is not None) and shape == "mixed" else 1) + 8

    t_load = time.time()
    if via_unsloth:
        model, tok = load_unsloth_model(args, ckpt, precision)
    else:
        tok = build_tokenizer(MODEL_SIZES[args.model_size]["vocab_size"])
        model = load_model(args, ckpt, precision, on_cuda, attn, base_dtype)
    result["base_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.dtype.is_floating_point})
    result["attn"] = getattr(model.config, "_attn_implementation", None)
    result["load_s"] = round(time.time() - t_load, 1)
    if on_cuda:
        result["load_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    ds = make_dataset(shape, n_samples, args.seq_len, MODEL_SIZES[args.model_size]["vocab_size"], args.seed)

    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    base = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_"),
        max_steps=total_steps,
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=ga,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="paged_adamw_32bit" if on_cuda else "adamw_torch",
        gradient_checkpointing=True,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not on_cuda,
        # pre-tokenized data: padding-free without packing needs max_length=None (TRL refuses otherwise); the
        # samples are already at most seq_len long, so nothing is lost.
        max_length=None if (padding_free and not packing) else args.seq_len,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(cfg_kw)
    if via_unsloth:
        del base["gradient_checkpointing"]  # Unsloth's own is set on the model (get_peft_model), as in its notebooks
    sft_args = SFTConfig(**base)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0, self.prof, self.probe = [], None, None, None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == 0 and kw.get("model") is not None:  # the first (untimed) step only
                self.probe = CheckpointProbe(kw["model"], compiled=bool(getattr(a, "torch_compile", False)))
            if on_cuda:
                torch.cuda.synchronize()
            if args.profile_dir and state.global_step == args.warmup + args.steps and self.prof is None:
                self.prof = start_profiler(on_cuda)
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if on_cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            if self.prof is not None and state.global_step == args.warmup + args.steps + PROFILE_STEPS:
                timed = self.times[args.warmup : args.warmup + args.steps]
                write_profile(
                    self.prof,
                    args.profile_dir,
                    f"{shape}_{recipe}",
                    sum(self.times[-PROFILE_STEPS:]),
                    PROFILE_STEPS,
                    sum(timed) / len(timed),
                )
                self.prof = None
            if self.probe is not None:
                result["checkpointing"] = self.probe.finish(
                    len(micro_tokens), expected=levers.get("gc", "full") != "off"
                )
                self.probe = None
            step_tokens.append(micro_tokens[:])
            micro_tokens.clear()

    micro_tokens, step_tokens = [], []

    class CountingSFTTrainer(SFTTrainer):
        # Counts the real (non-padding) input tokens of each micro-batch; otherwise the stock trainer.
        def training_step(self, model, inputs, *a, **k):
            micro_tokens.append(real_tokens(inputs))
            return super().training_step(model, inputs, *a, **k)

    timer = Timer()
    t_build = time.time()
    if via_unsloth:
        trainer = build_unsloth_trainer(args, model, tok, ds, sft_args)
        trainer.add_callback(timer)
        count_real_tokens(trainer, micro_tokens)
        result.update(
            micro_batch=trainer.args.per_device_train_batch_size,
            grad_accum=trainer.args.gradient_accumulation_steps,
            adapter_dtypes=sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
            # what Unsloth made of them (it turns padding-free on by itself where it pays)
            sft_kwargs={k: getattr(trainer.args, k, None) for k in ("packing", "packing_strategy", "padding_free")},
        )
    elif via_lora_kit is not None:
        trainer, chosen = build_lora_kit_trainer(
            args, info, model, tok, ds, mb, ga, total_steps, precision, via_lora_kit
        )
        result["levers_on"] = chosen.on()
        trainer.add_callback(timer)
        count_real_tokens(trainer, micro_tokens)
        result.update(
            micro_batch=trainer.args.per_device_train_batch_size,
            grad_accum=trainer.args.gradient_accumulation_steps,
            attn=trainer.model.get_base_model().config._attn_implementation,
            adapter_dtypes=sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
            sft_kwargs={k: getattr(trainer.args, k) for k in ("packing", "padding_free", "use_liger_kernel")},
        )
    else:
        trainer = CountingSFTTrainer(
            model=model,
            args=sft_args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[timer],
        )
    # TRL casts a quantized model's trainable adapter weights to bf16 while the trainer is built; fp16 mixed precision
    # then dies in the grad scaler at the first step, and fp32 base LoRA must stay fp32. Cast back after the build.
    if via_lora_kit is None and not via_unsloth and (precision in ("fp16", "fp32") or fp32_adapters):
        from lora_kit.speed import upcast_trainable_params

        result["upcast_params"] = upcast_trainable_params(trainer.model)
    if compile_layers:
        from lora_kit import speed

        result["compiled_blocks"] = speed.compile_layers(trainer.model)
    if onesync:
        from lora_kit import speed

        trainer.add_callback(speed.OptimizerLevers(one_sync=True, lean=lean))
    result["build_s"] = round(time.time() - t_build, 1)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result["pre_train_alloc_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
    if on_cuda and args.memory_report:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        before_recording = torch.cuda.memory_allocated()
    t_train = time.time()
    trainer.train()
    result["train_s"] = round(time.time() - t_train, 1)
    if on_cuda and args.memory_report:
        result["peak_breakdown"] = peak_breakdown(torch.cuda.memory._snapshot(), before_recording)
        torch.cuda.memory._record_memory_history(enabled=None)

    times = timer.times[args.warmup : args.warmup + args.steps]
    toks = [sum(t) for t in step_tokens[args.warmup : args.warmup + args.steps]]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result.update(
        {
            "status": "ok",
            "timed_steps": len(times),
            "median_step_s": round(statistics.median(times), 4) if times else None,
            "tokens_per_s": round(sum(toks) / sum(times), 1) if times and sum(times) > 0 else None,
            "real_tokens_per_step": round(statistics.mean(toks), 1) if toks else None,
            "step_times_s": [round(t, 4) for t in times],
            "losses": [round(x, 4) for x in losses],
            "loss_finite": all(math.isfinite(x) for x in losses) and len(losses) > 0,
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if on_cuda else None,
        }
    )
    if on_cuda:
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
    if via_unsloth:  # its trl and datasets are not the other recipes'
        result["versions"] = versions(("unsloth", "unsloth_zoo"))
    return result


def real_tokens(inputs) -> int:
    """Real (non-padding) input tokens of one micro-batch."""
    if "packed_seq_lengths" in inputs:  # Unsloth's packed or padding-free row: its samples' lengths
        return int(inputs["packed_seq_lengths"].sum())
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())  # padding-free: one flat row, no pad tokens (pad_to_multiple_of unset)


# ---- is gradient checkpointing really on? ------------------------------------------------------------------------
def first_decoder_layer(model):
    return next((m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")), None)


class CheckpointProbe:
    """Counts, during one optimizer step, how often the first decoder layer runs, and how many of those runs happen
    inside the backward pass: a recompute, i.e. gradient checkpointing at work.

    Two counters on that layer, the same for every recipe: a forward pre-hook on the layer (it runs inside the
    checkpointed region where transformers <= 5.17 checkpoints the layer's whole call, outside it on 5.23, which
    checkpoints its forward), and a wrapper around the function the layer hands to its checkpoint function
    (layer._gradient_checkpointing_func, which transformers' enabler and Unsloth's both set; never called when the
    layer is not checkpointed). With checkpointing the layer runs twice per micro-batch (the forward, then its
    recompute in the backward), without it once; the flags alone (layer.gradient_checkpointing) can say on while
    nothing is recomputed, and the count is what the memory follows. Both counters sit outside compiled code (lora_kit
    and Unsloth compile the layer's blocks or its forward, not its call); where the layer's call itself is compiled
    (a compiled model or layer) nothing is counted, since torch.compile would keep the hooks it traced. Installed for
    the first step only; finish() takes it off.
    """

    def __init__(self, model, compiled=False):
        self.runs, self.undo = {}, []
        layer = first_decoder_layer(model)
        if (
            layer is None
            or compiled
            or any(
                getattr(m, "_compiled_call_impl", None) is not None and any(x is layer for x in m.modules())
                for m in model.modules()
            )
        ):
            return
        function = layer.__dict__.get("_gradient_checkpointing_func")
        self.flags = {
            "layer": type(layer).__name__,
            # what the layer's flag says (True, or Unsloth's "unsloth" for its offloading mode) ...
            "layer_flag": repr(getattr(layer, "gradient_checkpointing", None)),
            # ... and the checkpoint function set on it (Unsloth's offloading one is unsloth_checkpoint)
            "checkpoint_function": getattr(getattr(function, "func", function), "__name__", None),
        }
        self.runs = {"layer": {"forward": 0, "recompute": 0}, "checkpointed": {"forward": 0, "recompute": 0}}
        self.undo.append(layer.register_forward_pre_hook(self._counter(self.runs["layer"])).remove)
        if function is not None:
            count = self._counter(self.runs["checkpointed"])

            def checkpoint(run, *args, **kwargs):
                def counted(*a, **k):
                    count()
                    return run(*a, **k)

                return function(counted, *args, **kwargs)

            layer._gradient_checkpointing_func = checkpoint
            self.undo.append(lambda: setattr(layer, "_gradient_checkpointing_func", function))

    @staticmethod
    def _counter(tally):
        import torch

        @torch.compiler.disable
        def count(*_):  # inside a backward pass the autograd engine has a graph task running
            tally["recompute" if torch._C._current_graph_task_id() != -1 else "forward"] += 1

        return count

    def finish(self, micro_batches, expected=True) -> dict | None:
        """Take the counters off; recomputes_per_micro_batch (1 with checkpointing, 0 without), active, whether that is
        what the recipe asked for, and both counters' runs (None where nothing was counted)."""
        for undo in self.undo:
            undo()
        self.undo = []
        if not self.runs or not micro_batches or not self.runs["layer"]["forward"]:
            return None  # no decoder layer, its call compiled, or it never ran through the counter
        recomputes = max(r["recompute"] for r in self.runs.values()) / micro_batches
        return {
            **self.flags,
            "micro_batches": micro_batches,
            "runs": self.runs,
            "recomputes_per_micro_batch": round(recomputes, 2),
            "active": recomputes > 0,
            "expected": expected,
        }


def checkpointing_mark(result) -> str:
    """The table's ckpt cell: on / off as measured, OFF! where the recipe asked for checkpointing and got none."""
    c = result.get("checkpointing")
    if not c:
        return "-"
    if c["active"] == c["expected"]:
        return "on" if c["active"] else "off"
    return "ON!" if c["active"] else "OFF!"


def count_real_tokens(trainer, micro_tokens):
    """Note each micro-batch's real tokens in `micro_tokens`, then run the trainer's own training step."""
    own_step = trainer.training_step

    def counting_step(model, inputs, *a, **k):
        micro_tokens.append(real_tokens(inputs))
        return own_step(model, inputs, *a, **k)

    trainer.training_step = counting_step


def lora_kit_levers(args, info, precision, lengths):
    """The levers lora_kit.speed decides for fast_capability and samples of these lengths, as build_trainer would."""
    from lora_kit import speed

    decided, _ = speed.Levers().decide(fast_capability(args, info), precision, args.method, lengths, args.seq_len)
    return decided


def build_unsloth_trainer(args, model, tok, ds, sft_args):
    """Unsloth's recipe from its notebooks: LoRA through FastLanguageModel.get_peft_model with Unsloth's gradient
    checkpointing, then trl's SFTTrainer, which `import unsloth` has replaced with its own."""
    from trl import SFTTrainer
    from unsloth import FastLanguageModel

    model = FastLanguageModel.get_peft_model(
        model,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0,
        target_modules=TARGET_MODULES,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=args.seed,
    )
    return SFTTrainer(model=model, args=sft_args, train_dataset=ds, processing_class=tok)


def build_lora_kit_trainer(args, info, model, tok, ds, mb, ga, total_steps, precision, via_lora_kit):
    """The trainer a lora_kit user gets (build_trainer, TrainSettings(fast=True)), with the stock recipe's settings.

    The levers are decided here for fast_capability (the real chip, or the emulated one of the T4 proxy) and these
    data, as build_trainer would, then the recipe's forced levers replace their decisions. Returns (trainer, levers).
    """
    from dataclasses import replace

    from lora_kit import train as lk_train

    decided = lora_kit_levers(args, info, precision, [len(ids) for ids in ds["input_ids"]])
    levers = replace(decided, **via_lora_kit["forced"])
    lora = lk_train.LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=0.0, target_modules=TARGET_MODULES)
    settings = lk_train.TrainSettings(
        learning_rate=2e-4,
        micro_batch_size=mb,
        gradient_accumulation_steps=ga,
        max_steps=total_steps,
        max_length=args.seq_len,
        optim="paged_adamw_32bit",
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        gradient_checkpointing=True,
        offload_activations=via_lora_kit["offload"],
        logging_steps=1,
        save_steps=10**9,
        output_dir=tempfile.mkdtemp(prefix="bench_lk_"),
        seed=args.seed,
        fast=True,
        levers=levers,
        report_to="none",
    )
    trainer = lk_train.build_trainer(model, tok, ds, lora=lora, train=settings, precision=precision)
    if via_lora_kit["whole_layers"] and decided.compile_blocks:
        compile_whole_layers(trainer.model, levers.autotune_pointwise)
    return trainer, levers


def compile_whole_layers(model, autotune_pointwise=False) -> int:
    """Experiment: torch.compile each decoder layer whole (inside gradient checkpointing, like speed.compile_layers)."""
    from lora_kit import speed

    speed._allow_a_recompile_per_layer()
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(options={"triton.autotune_pointwise": autotune_pointwise})
            n += 1
    return n


# ---- profiling ---------------------------------------------------------------------------------------------------
PROFILE_STEPS = 2


def peak_breakdown(snapshot, before_recording, top=14):
    """Replay a memory-history snapshot: what was alive at the peak, grouped by the innermost allocating frame that is
    not torch's own code (bitsandbytes, peft, transformers, liger, trl, ...). Sizes in GiB."""
    trace = snapshot["device_traces"][0]
    live, cur, peak, peak_at = {}, before_recording, before_recording, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            cur += e["size"]
            if cur > peak:
                peak, peak_at = cur, i
        elif e["action"] == "free_completed":
            cur -= live.pop(e["addr"], e["size"])
    live, groups = {}, {}
    for e in trace[: peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)

    def label(frames):
        for f in frames:
            name = f.get("filename", "")
            if "/torch/" not in name and "<" not in name and not name.endswith("bench_train.py"):
                return f"{name.split('site-packages/')[-1]}:{f.get('line')} {f.get('name')}"
        return f"{frames[0]['filename'].split('site-packages/')[-1]}:{frames[0].get('line')}" if frames else "?"

    for e in live.values():
        key = label(e.get("frames", []))
        size, n = groups.get(key, (0, 0))
        groups[key] = (size + e["size"], n + 1)
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "peak_gib": round(peak / GIB, 3),
        "before_training_gib": round(before_recording / GIB, 3),
        "allocated_during_training_alive_at_peak": [
            {"gib": round(size / GIB, 3), "tensors": n, "where": key} for key, (size, n) in rows
        ],
    }


def start_profiler(on_cuda):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    prof = profile(activities=acts, record_shapes=False)
    prof.__enter__()
    return prof


def write_profile(prof, out_dir, name, wall_s, steps, timed_step_s):
    """Top ops by GPU time and by CPU time, plus the GPU-busy share: is the step GPU-bound? The profiler slows the
    host, so the share is also given against the mean step of the timed (unprofiled) steps."""
    from torch.autograd import DeviceType

    prof.__exit__(None, None, None)
    events = prof.key_averages()
    # Kernels, copies and memsets only: an aten op's own device time repeats that of the kernels it launched.
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    syncs = {
        e.key: e.count
        for e in events
        if "Synchronize" in e.key or "Memcpy" in e.key or e.key == "aten::item" or e.key == "aten::_local_scalar_dense"
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / f"profile_{name}.txt", "w") as fh:
        fh.write(
            f"{steps} steps, wall {wall_s:.3f} s, GPU kernel time {gpu_us / 1e6:.3f} s "
            f"({100 * gpu_us / 1e6 / wall_s:.0f}% busy); per step {gpu_us / 1e3 / steps:.0f} ms of kernels against "
            f"{1e3 * timed_step_s:.0f} ms per timed step ({100 * gpu_us / 1e6 / steps / timed_step_s:.0f}% busy)\n"
            f"sync/copy calls: {json.dumps(syncs)}\n\n"
        )
        fh.write(idle_gaps(prof.events(), DeviceType.CUDA))
        fh.write(events.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70))
        fh.write("\n\n")
        fh.write(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    print(
        f"# profile {name}: wall {wall_s:.3f} s for {steps} steps, kernels {gpu_us / 1e6:.3f} s, "
        f"timed step {1e3 * timed_step_s:.0f} ms",
        flush=True,
    )


def idle_gaps(events, device_type, top=20, min_us=20.0) -> str:
    """Where the GPU waits: the gaps between one kernel's end and the next kernel's start (the host was still
    launching, or waiting), summed by the pair of kernels on either side. Under the profiler the host runs slower,
    so the gaps are longer than in the timed steps; their places are what this shows."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == device_type)
    by_pair, total, end, before = {}, 0.0, None, None
    for start, stop, name in kernels:
        if end is not None and start - end > min_us:
            pair = (before[:50], name[:50])
            gap = start - end
            total += gap
            count, summed = by_pair.get(pair, (0, 0.0))
            by_pair[pair] = (count + 1, summed + gap)
        if end is None or stop > end:
            end, before = stop, name
    lines = [f"GPU idle in gaps over {min_us:.0f} us: {total / 1e3:.1f} ms in all; the largest sums by neighbours:"]
    for (after, then), (count, summed) in sorted(by_pair.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {summed / 1e3:8.1f} ms  {count:5d} gaps  after {after}  before {then}")
    return "\n".join(lines) + "\n\n"


# ---- driver ------------------------------------------------------------------------------------------------------
# Unsloth patches transformers, peft and trl as it is imported, and this script imports lora_kit (so transformers) at
# its top: the unsloth recipe's worker imports unsloth first, then runs this script as __main__.
IMPORT_UNSLOTH_FIRST = (
    "import runpy, sys, unsloth; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def unsloth_missing(site) -> str | None:
    """Why the unsloth recipe cannot run with this site folder (None: it can)."""
    if not site:
        return "no --unsloth-site and no UNSLOTH_SITE: Unsloth runs from its own site folder (benchmarks/README.md)"
    if not (Path(site) / "unsloth" / "__init__.py").is_file():
        return f"{site} holds no unsloth package (install its wheels there with pip install --target)"
    return None


# Unsloth declares the transformers versions it supports (2026.10.9: <=5.17.0), and outside them its Llama path can
# lose gradient checkpointing without a word: transformers 5.23 checkpoints a decoder layer in a wrapper around the
# layer class's forward, installed when the class is defined, and Unsloth replaces that forward with its own
# (LlamaDecoderLayer.forward = LlamaDecoderLayer_fast_forward) and leaves checkpointing to
# GradientCheckpointingLayer.__call__, where transformers <= 5.17 did it. So by default the unsloth recipe's worker
# imports the first transformers on its path that Unsloth's requirement admits: a folder on PYTHONPATH whose
# transformers it does not admit is replaced on that worker's path by a view of it without transformers (the other
# recipes' folder keeps serving peft, bitsandbytes and the rest), so the one after it, or the interpreter's own, is
# imported. --unsloth-transformers path keeps the path as it is.
def unsloth_transformers_requirement(site) -> str | None:
    """The transformers versions Unsloth's wheel metadata admits (its unconditional Requires-Dist), or None."""
    from packaging.requirements import InvalidRequirement, Requirement

    for meta in sorted(Path(site).glob("unsloth-*.dist-info/METADATA")):
        for line in meta.read_text(errors="replace").splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            try:
                req = Requirement(line.split(":", 1)[1].strip())
            except InvalidRequirement:
                continue
            if req.name == "transformers" and req.marker is None:
                return str(req.specifier)
    return None


def transformers_in(folder) -> str | None:
    """Version of the transformers installed in `folder` (pip install --target), from its dist-info."""
    if not (Path(folder) / "transformers").is_dir():
        return None
    infos = sorted(Path(folder).glob("transformers-*.dist-info"))
    return infos[0].name[len("transformers-") : -len(".dist-info")] if infos else None


def interpreter_transformers() -> str | None:
    """Version of the interpreter's own transformers (the one imported with no PYTHONPATH), or None."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "from importlib.metadata import version; print(version('transformers'))"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def without_transformers(folder) -> str:
    """A folder of links to everything in `folder` but transformers and its dist-info."""
    view = Path(tempfile.mkdtemp(prefix="bench_no_transformers_"))
    for entry in Path(folder).iterdir():
        if entry.name == "transformers" or (
            entry.name.startswith("transformers-") and entry.name.endswith(".dist-info")
        ):
            continue
        (view / entry.name).symlink_to(entry.absolute())
    return str(view)


@functools.lru_cache(maxsize=None)
def unsloth_path(site, pythonpath, transformers="supported", own=interpreter_transformers):
    """The unsloth worker's PYTHONPATH folders and a record of the transformers it imports.

    transformers="supported": the first transformers on the path (the site folder, then PYTHONPATH's folders in
    order, then the interpreter's own) that Unsloth's requirement admits; folders before it that hold another are
    replaced by a view without it. "path": the path as it is. With no admitted one anywhere the path stays as it is
    and the record says so. `own` gives the interpreter's own version (asked only when no folder's is admitted).
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    folders = [site] + [p for p in (pythonpath or "").split(os.pathsep) if p]
    required = unsloth_transformers_requirement(site)
    found = [(folder, transformers_in(folder)) for folder in folders]
    record = {"mode": transformers, "required": required, "found": {f: v for f, v in found if v}}

    def admitted(version):
        try:
            return version is not None and Version(version) in SpecifierSet(required)
        except InvalidVersion:
            return False

    first = next(((f, v) for f, v in found if v), None)
    if transformers == "path" or not required or (first and admitted(first[1])):
        chosen = first or ("interpreter", own())
    else:
        chosen = next(((f, v) for f, v in found if admitted(v)), None)
        if chosen is None and admitted(interpreter := own()):
            chosen = ("interpreter", interpreter)
        if chosen is None:
            record["note"] = f"no transformers on the path or in the interpreter meets Unsloth's {required}"
            chosen = first or ("interpreter", own())
        else:
            stop = folders.index(chosen[0]) if chosen[0] in folders else len(folders)
            hidden = [f for f, v in found[:stop] if v]
            record["hidden"] = hidden
            folders = [without_transformers(f) if f in hidden else f for f in folders]
    record.update(version=chosen[1], source=chosen[0])
    record["admitted"] = admitted(chosen[1]) if required else None
    return folders, record


def unsloth_env(site, pythonpath, compiled_cache=None, transformers="supported") -> dict:
    """Environment of the unsloth recipe's worker: its site folder first on the path (its trl and datasets shadow the
    other recipes'; transformers as unsloth_path chooses), no hub look-ups (the checkpoint is local, and Unsloth
    otherwise downloads a file from the hub to count its users), and the modules Unsloth generates written to a
    temporary folder, not the working directory."""
    folders, _ = unsloth_path(site, pythonpath or None, transformers)
    return {
        "PYTHONPATH": os.pathsep.join(folders),
        "HF_HUB_OFFLINE": "1",
        "UNSLOTH_DISABLE_STATISTICS": "1",
        "UNSLOTH_COMPILE_LOCATION": compiled_cache or os.path.join(tempfile.gettempdir(), "bench_unsloth_compiled"),
    }


def run_in_subprocess(args, shape, recipe, argv):
    script = os.path.abspath(__file__)
    cmd = [sys.executable, script, *argv, "--worker", shape, recipe]
    env = dict(os.environ)
    unsloth_cache, extra = None, {}
    if args.cold_compile:
        cache = tempfile.mkdtemp(prefix="bench_cold_")
        env.update(
            TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"), TRITON_CACHE_DIR=os.path.join(cache, "triton")
        )
        unsloth_cache = os.path.join(cache, "unsloth")
    if RECIPES[recipe].get("unsloth"):
        cmd = [sys.executable, "-c", IMPORT_UNSLOTH_FIRST, script, *argv, "--worker", shape, recipe]
        transformers = args.unsloth_transformers
        extra["unsloth_transformers"] = unsloth_path(args.unsloth_site, env.get("PYTHONPATH") or None, transformers)[1]
        env.update(unsloth_env(args.unsloth_site, env.get("PYTHONPATH"), unsloth_cache, transformers))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.recipe_timeout, env=env)
    except subprocess.TimeoutExpired as e:
        return {
            "shape": shape,
            "recipe": recipe,
            "status": "error",
            "error": f"timeout after {args.recipe_timeout}s",
            "log_tail": (e.stdout or "")[-2000:] if isinstance(e.stdout, str) else "",
            **extra,
        }
    tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-3500:]).strip()
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG) :])
            res["wall_s"] = round(time.time() - t0, 1)
            if res.get("status") != "ok":  # the worker's traceback went to stderr
                res["log_tail"] = tail
            return {**res, **extra}
    return {
        "shape": shape,
        "recipe": recipe,
        "status": "error",
        "error": f"exit {proc.returncode}",
        "log_tail": tail,
        **extra,
    }


# Every recipe is compared with each of these that ran, per shape: "stock" (16-bit unquantized modules; ratio keys
# "fixed/lora_kit"), "unsloth" ("fixed/lora_kit vs unsloth") and "stock_fp32base" ("fixed/lora_kit vs
# stock_fp32base"), the Llama-2 QLoRA Colab tutorial's loading, which reproduces the stock figures the speed targets
# were set against: kept as an extra row and in the JSON, not in the table's ratio columns.
BASELINES = {"stock": "", "unsloth": " vs unsloth", "stock_fp32base": " vs stock_fp32base"}


def aggregate(results):
    """Per (shape, recipe) that ran: mean tokens/s and real tokens per step, and the highest peak.

    A recipe named more than once (stock,lora_kit,stock,lora_kit: interleaved repeats against drift on a shared
    machine) is compared through the mean of its repeats' tokens/s and the highest of their peaks.
    """
    groups = {}
    for r in results:
        if r.get("status") == "ok":
            groups.setdefault((r["shape"], r["recipe"]), []).append(r)

    def mean(runs, key):
        values = [x[key] for x in runs if x.get(key)]
        return sum(values) / len(values) if values else None

    return {
        key: {
            "tokens_per_s": mean(runs, "tokens_per_s"),
            "real_tokens_per_step": mean(runs, "real_tokens_per_step"),
            "peak_gib": max((x["peak_gib"] for x in runs if x.get("peak_gib")), default=None),
        }
        for key, runs in groups.items()
    }


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def summarize(results):
    """Each recipe's tokens/s and peak as ratios of each baseline's (BASELINES), per shape."""
    by = aggregate(results)
    ratios = {}
    for baseline, suffix in BASELINES.items():
        for (shape, recipe), r in by.items():
            base = by.get((shape, baseline))
            if not base or recipe == baseline:
                continue
            entry = {"tokens_per_s": ratio(r["tokens_per_s"], base["tokens_per_s"])}
            entry["peak"] = ratio(r["peak_gib"], base["peak_gib"])
            ratios[f"{shape}/{recipe}{suffix}"] = {k: v for k, v in entry.items() if v is not None}
    return ratios


def vs_unsloth_summary(results, device, precision, other_versions):
    """lora_kit against Unsloth per shape: speed_ratio (real tokens/s) and memory_ratio (peak allocated), both
    lora_kit / Unsloth, beside both recipes' own figures; None when no unsloth recipe ran."""
    if not any(r.get("recipe") == "unsloth" for r in results):
        return None
    by = aggregate(results)

    def figures(shape, recipe):
        runs = [r for r in results if r.get("shape") == shape and r.get("recipe") == recipe]
        ok = [r for r in runs if r.get("status") == "ok"]
        if not ok:
            failed = runs[-1] if runs else {}
            return {"error": failed.get("error", "did not run"), "log_tail": failed.get("log_tail", "")[-1500:]}
        out = {**by[(shape, recipe)], "micro_batch": ok[0]["micro_batch"], "grad_accum": ok[0]["grad_accum"]}
        if any(r.get("checkpointing") for r in ok):  # as measured: on, or OFF! where it was asked for and missing
            out["checkpointing"] = "/".join(sorted({checkpointing_mark(r) for r in ok}))
        return out

    out = {}
    for shape in dict.fromkeys(r["shape"] for r in results):
        lk, us = by.get((shape, "lora_kit"), {}), by.get((shape, "unsloth"), {})
        out[shape] = {
            "speed_ratio": ratio(lk.get("tokens_per_s"), us.get("tokens_per_s")),
            "memory_ratio": ratio(lk.get("peak_gib"), us.get("peak_gib")),
            "lora_kit": figures(shape, "lora_kit"),
            "unsloth": figures(shape, "unsloth"),
        }
        # lora_kit with one switch changed (lora_kit_offload: TrainSettings.offload_activations), same ratios
        variants = sorted({r["recipe"] for r in results if r["shape"] == shape and r["recipe"].startswith("lora_kit_")})
        if variants:
            out[shape]["variants"] = {
                name: {
                    "speed_ratio": ratio(by.get((shape, name), {}).get("tokens_per_s"), us.get("tokens_per_s")),
                    "memory_ratio": ratio(by.get((shape, name), {}).get("peak_gib"), us.get("peak_gib")),
                    **figures(shape, name),
                }
                for name in variants
            }
    unsloth_versions = next((r["versions"] for r in results if r.get("recipe") == "unsloth" and "versions" in r), None)
    out.update(
        device=device["name"],
        precision=precision,
        versions={"unsloth recipe": unsloth_versions, "other recipes": other_versions},
    )
    chosen = next((r["unsloth_transformers"] for r in results if r.get("unsloth_transformers")), None)
    if chosen:  # which transformers the unsloth recipe imported, and why (unsloth_path)
        out["unsloth_transformers"] = chosen
    return out


def print_table(results, ratios):
    """One row per run: real tokens per step, tokens/s and peak, each also as a ratio of stock's and Unsloth's."""

    def against(r, baseline, key):
        if r["recipe"] == baseline:
            return "1.00"
        value = ratios.get(f"{r['shape']}/{r['recipe']}{BASELINES[baseline]}", {}).get(key)
        return "-" if value is None else f"{value:.2f}"

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    hdr = (
        f"{'shape':6} {'recipe':14} {'mb x ga':8} {'tok/step':>8} {'tokens/s':>9} {'x stock':>7} {'x unsl.':>7} "
        f"{'step s':>7} {'peak GiB':>8} {'x stock':>7} {'x unsl.':>7} {'ckpt':>5} {'loss first->last':>18}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if r.get("status") != "ok":
            print(f"{r['shape']:6} {r['recipe']:14} ERROR {r.get('error', '')}")
            continue
        losses = r.get("losses") or [float("nan")]
        print(
            f"{r['shape']:6} {r['recipe']:14} {str(r['micro_batch']) + 'x' + str(r['grad_accum']):8} "
            f"{cell(r.get('real_tokens_per_step'), '.0f'):>8} {cell(r.get('tokens_per_s'), '.1f'):>9} "
            f"{against(r, 'stock', 'tokens_per_s'):>7} {against(r, 'unsloth', 'tokens_per_s'):>7} "
            f"{cell(r.get('median_step_s'), '.3f'):>7} {cell(r.get('peak_gib'), '.2f'):>8} "
            f"{against(r, 'stock', 'peak'):>7} {against(r, 'unsloth', 'peak'):>7} {checkpointing_mark(r):>5} "
            f"{losses[0]:8.3f}->{losses[-1]:8.3f}"
        )
    print(
        "ckpt: gradient checkpointing as measured in the first step (the first decoder layer recomputed in the "
        "backward: on; not: off); OFF! / ON!: not what the recipe asked for"
    )
    wrong = [f"{r['shape']}/{r['recipe']}" for r in results if checkpointing_mark(r) in ("OFF!", "ON!")]
    if wrong:
        print(
            f"WARNING: gradient checkpointing is not what the recipe asked for in {', '.join(wrong)}: not like for like"
        )
    if any(r.get("recipe") == "stock_fp32base" for r in results):
        print(
            "stock_fp32base: an extra row, stock with the unquantized modules in fp32 (the Llama-2 QLoRA Colab "
            "tutorial's loading); the ratio columns are against stock (bf16) and Unsloth"
        )


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    info = device_info()
    precision = resolve_precision(args, info)
    if args.ckpt_dir is None:
        import shutil

        # RAM-backed /dev/shm when it has room for a 7B bf16 checkpoint (13.5 GB): reloads cost no disk reads.
        shm_ok = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 20 * GIB
        root = "/dev/shm" if shm_ok and info["device"] == "cuda" else tempfile.gettempdir()
        args.ckpt_dir = os.path.join(
            root, f"lora_kit_bench_{args.model_size}_{'bf16' if precision != 'fp32' else 'fp32'}"
        )

    if args.worker:
        shape, recipe = args.worker
        try:
            res = run_recipe(args, shape, recipe, Path(args.ckpt_dir))
        except Exception as e:  # noqa: BLE001 - the driver reports the failure in the table
            import traceback

            traceback.print_exc()
            res = {"shape": shape, "recipe": recipe, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [r for r in recipes if r not in RECIPES] + [s for s in shapes if s not in ("fixed", "mixed")]
    if unknown:
        raise SystemExit(f"unknown recipe/shape {unknown}: recipes are {sorted(RECIPES)}, shapes fixed,mixed")
    skipped = {}
    if "unsloth" in recipes and (missing := unsloth_missing(args.unsloth_site)):
        if args.unsloth_site:  # named, but wrong: stop before any recipe spends GPU time
            raise SystemExit(f"--unsloth-site: {missing}")
        print(f"# unsloth recipe skipped: {missing}", flush=True)
        skipped["unsloth"] = missing
        recipes = [r for r in recipes if r != "unsloth"]
    if "unsloth" in recipes:
        _, chosen = unsloth_path(args.unsloth_site, os.environ.get("PYTHONPATH") or None, args.unsloth_transformers)
        print(
            f"# unsloth recipe: transformers {chosen['version']} from {chosen['source']} (Unsloth requires "
            f"{chosen['required']}; hidden from its path: {chosen.get('hidden') or 'none'})"
            + (f"; {chosen['note']}" if chosen.get("note") else ""),
            flush=True,
        )
    # The checkpoint stores 16-bit weights for GPU runs (what a hub checkpoint holds), fp32 on CPU.
    ckpt, build_s = ensure_checkpoint(args, "bf16" if precision != "fp32" else "fp32")
    print(
        f"# device {info['name']} | precision {precision} | method {args.method} | model {args.model_size} | "
        f"checkpoint {ckpt} (built in {build_s:.0f}s)",
        flush=True,
    )
    in_process = args.in_process or info["device"] == "cpu"
    worker_argv = [a for a in argv if a != "--in-process"] + ["--ckpt-dir", str(ckpt)]
    results = []
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        for recipe in recipes:
            t0 = time.time()
            if in_process and not RECIPES[recipe].get("unsloth"):  # Unsloth needs its own site folder: a subprocess
                try:
                    res = run_recipe(args, shape, recipe, ckpt)
                except Exception as e:  # noqa: BLE001
                    res = {"shape": shape, "recipe": recipe, "status": "error", "error": f"{type(e).__name__}: {e}"}
                res["wall_s"] = round(time.time() - t0, 1)
            else:
                res = run_in_subprocess(args, shape, recipe, worker_argv)
            results.append(res)
            if args.json_out:  # one line per recipe as it finishes: survives a run cut short
                with open(str(args.json_out) + ".partial.jsonl", "a") as fh:
                    fh.write(json.dumps(res) + "\n")
            brief = {
                k: res.get(k)
                for k in (
                    "shape",
                    "recipe",
                    "status",
                    "tokens_per_s",
                    "real_tokens_per_step",
                    "median_step_s",
                    "peak_gib",
                    "wall_s",
                    "error",
                )
            }
            brief["ckpt"] = checkpointing_mark(res)
            print("# " + json.dumps(brief), flush=True)
            if res.get("status") != "ok" and res.get("log_tail"):
                print(res["log_tail"][-3000:], flush=True)
    ratios = summarize(results)
    print()
    print_table(results, ratios)
    out = {
        "device": info,
        "precision": precision,
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "versions": versions(),
        "results": results,
        "ratios": ratios,
        "skipped": skipped,
    }
    out["vs_unsloth"] = vs_unsloth_summary(results, info, precision, out["versions"])
    for path, content in ((args.json_out, out), (args.vs_unsloth_out, out["vs_unsloth"])):
        if path and content is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(content, indent=1) + "\n")
    if args.vs_unsloth_out and out["vs_unsloth"] is None:
        print(f"# no unsloth run: {args.vs_unsloth_out} not written", flush=True)
    print(json.dumps(out), flush=True)
    return 0 if all(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
