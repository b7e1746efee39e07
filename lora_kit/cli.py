"""The command line: ``lora-kit`` (or ``python -m lora_kit``).

    lora-kit demo                              # the main job: the embedded model learns the demo task, on a CPU
    lora-kit config qlora > my.yaml            # a recipe as a config file, every value with its reason
    lora-kit train my.yaml --set train.max_steps=10
    lora-kit train my.yaml --processes 2       # data parallel: one process per GPU, launched through accelerate
    lora-kit estimate my.yaml                  # training memory of each method for the config's model and shape
    lora-kit merge outputs/qlora/adapter outputs/qlora/merged
    lora-kit export outputs/qlora/merged outputs/qlora/model-q8_0.gguf   # for llama.cpp and Ollama
    lora-kit chat outputs/qlora/merged         # talk to a model or an adapter folder in the terminal

Every command checks its input before loading a model, and a bad input ends with one clear
message (exit status 2), not a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from .errors import LoraKitError

RUN_HELP = "KEY=VALUE: override one knob by its dotted name, e.g. train.max_steps=10 (repeatable)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-kit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fine-tune the embedded model on the demo task and report before/after")
    demo.add_argument("--method", choices=["lora", "lora8", "qlora"], default="lora")
    demo.add_argument("--model", help="another model than the embedded one (a local folder or Hub id)")
    demo.add_argument("--steps", type=int, help="optimizer steps (default 30)")
    demo.add_argument("--batch-size", type=int, help="examples per step (default 4)")
    demo.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    demo.add_argument("--r", type=int, help="LoRA rank (default 16; alpha follows as 2 r)")
    demo.add_argument("--n-eval", type=int, help="held-out examples, all answered before and after (default 40)")
    demo.add_argument("--output-dir", help="where the adapter and merged model go (default outputs/demo)")
    demo.add_argument(
        "--no-fast", dest="fast", action="store_false", default=None, help="the stock TRL path, no speed levers"
    )

    config = sub.add_parser("config", help="print a method's recipe as a config file, with the reason for each value")
    config.add_argument("method", choices=["lora", "lora8", "qlora"])
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=RUN_HELP)

    train = sub.add_parser("train", help="train, evaluate, save and merge as a config file says")
    train.add_argument("config", help="a YAML config (see configs/ or `lora-kit config`)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=RUN_HELP)
    train.add_argument("--no-merge", dest="merge", action="store_false", help="stop after saving the adapter")
    train.add_argument("--check", action="store_true", help="only check the config and print the resolved knobs")
    train.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes on this machine (one per GPU; without a GPU they share the cores), started with "
        "accelerate launch, whose command is printed; the batch per step stays the config's",
    )

    estimate = sub.add_parser("estimate", help="training memory of each method for a config's model and shape")
    estimate.add_argument("config")
    estimate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=RUN_HELP)

    merge = sub.add_parser("merge", help="merge an adapter into its base's weights, streamed and checked")
    merge.add_argument("adapter_dir")
    merge.add_argument("out_dir")
    merge.add_argument(
        "--base",
        choices=["original", "dequantized"],
        default="original",
        help="the base's own weights, or the quantized weights training saw (QLoRA, 8-bit)",
    )
    merge.add_argument("--base-model", help="where the base is when the adapter's recorded name no longer finds it")

    export = sub.add_parser("export", help="a merged model folder as one GGUF file (llama.cpp, Ollama) + Modelfile")
    export.add_argument("merged_dir")
    export.add_argument("out", help="the .gguf file to write, beside the folder")
    export.add_argument("--type", choices=["f16", "q8_0", "q4_k_m"], default="q8_0", help="weights in the file")

    chat = sub.add_parser("chat", help="talk to a model or adapter folder in the terminal (empty line or Ctrl-D ends)")
    chat.add_argument("model", help="a merged model folder, an adapter folder, or a model name")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    return parser


def _demo(args) -> dict:
    from .demo import demo_settings, run

    knobs = {
        "model": args.model,
        "max_steps": args.steps,
        "micro_batch_size": args.batch_size,
        "learning_rate": args.lr,
        "output_dir": args.output_dir,
        "fast": args.fast,
    }
    if args.r:
        knobs.update(r=args.r, alpha=2 * args.r)
    if args.n_eval:
        knobs.update(n_eval=args.n_eval, eval_samples=args.n_eval)
    return run(demo_settings(args.method, **{k: v for k, v in knobs.items() if v is not None}))


def _launch(args) -> int:
    """This train command in ``args.processes`` processes, through accelerate launch; the launcher's exit status."""
    from .distributed import launch_command

    again = ["train", args.config, *(f"--set={item}" for item in args.set), *([] if args.merge else ["--no-merge"])]
    command = launch_command(args.processes, again)
    print(f"lora-kit train: {args.processes} processes, launched as: {shlex.join(command)}", flush=True)
    return subprocess.run(command).returncode


def _estimate(settings) -> str:
    from .course import memory_estimates, memory_summary, model_config

    breakdowns = memory_estimates(
        model_config(settings), r=settings.r, micro_batch=settings.micro_batch_size, seq_len=settings.max_length
    )
    return (
        f"{settings.model}, r={settings.r}, {settings.micro_batch_size} x {settings.max_length} tokens per "
        f"micro-batch, gradient checkpointing:\n{memory_summary(breakdowns)}"
    )


def _load_for_chat(name: str):
    """A model folder or name through load_model; an adapter folder on its base, in this machine's precision."""
    from .models import load_model

    folder = Path(name)
    if not (folder / "adapter_config.json").is_file():
        return load_model(name)
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from .hardware import resolve_precision, torch_dtype

    kwargs = {"dtype": torch_dtype(resolve_precision("auto"))}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    return AutoPeftModelForCausalLM.from_pretrained(folder, **kwargs), AutoTokenizer.from_pretrained(folder)


def _chat(args) -> None:
    from .chat import ChatSession
    from .evaluate import GenerationSettings

    session = ChatSession(*_load_for_chat(args.model), GenerationSettings(max_new_tokens=args.max_new_tokens))
    print(f"Chatting with {args.model}. An empty line or Ctrl-D ends.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        try:
            session.conversation(text)  # a message too long to answer: say so, keep chatting
        except LoraKitError as err:
            print(f"error: {err}")
            continue
        print("model> ", end="", flush=True)
        session.send(text, on_token=lambda piece: print(piece, end="", flush=True))
        print()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .course import quiet_known_noise

    quiet_known_noise()
    try:
        if args.command == "demo":
            print(json.dumps(_demo(args)))
        elif args.command == "config":
            from .config import config_text, recipe

            settings = recipe(args.method, args.set)
            print(
                config_text(settings, f"The {args.method} recipe for this machine; every value with its reason."),
                end="",
            )
        elif args.command == "train":
            from .config import config_text, load_config
            from .demo import run

            settings = load_config(args.config, args.set)
            if args.check:
                print(config_text(settings, f"{args.config}, as it will run"), end="")
            elif args.processes != 1:
                return _launch(args)
            elif (result := run(settings, merge=args.merge)) is not None:  # None: not the main process of a launch
                print(json.dumps(result))
        elif args.command == "estimate":
            from .config import load_config

            print(_estimate(load_config(args.config, args.set)))
        elif args.command == "merge":
            from .merge import merge_adapter

            print(merge_adapter(Path(args.adapter_dir), Path(args.out_dir), base=args.base, base_model=args.base_model))
        elif args.command == "export":
            from .export import export_gguf, write_modelfile

            gguf = export_gguf(args.merged_dir, args.out, args.type)
            print(
                f"{gguf} ({gguf.stat().st_size / 2**20:,.0f} MiB); Ollama: ollama create NAME -f {write_modelfile(gguf)}"
            )
        elif args.command == "chat":
            _chat(args)
    except LoraKitError as err:
        print(f"lora-kit {args.command}: {err}", file=sys.stderr)
        return 2
    return 0
