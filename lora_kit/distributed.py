"""Several processes, one training run (data parallel), with accelerate as the engine.

``accelerate launch`` (torchrun underneath) starts one process per GPU; the Trainer under TRL's
SFTTrainer wraps the model in DistributedDataParallel, gives every process micro-batches of its
own and averages the gradients. lora_kit adds no distributed code: this module answers the
questions a run asks (is this the main process, how many are there, which batch keeps the
recipe's) and refuses launches that cannot work.

    lora-kit train configs/demo.yaml --processes 2      # runs accelerate launch for you, and prints how
    accelerate launch --config_file configs/accelerate/ddp.yaml -m lora_kit train my.yaml

A model too large for one GPU even in 4 bits trains sharded: FSDP (through accelerate) splits the NF4 weights, the
adapters, their gradients and optimizer states over the processes (configs/accelerate/fsdp-qlora.yaml):

    accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml -m lora_kit train my-70b.yaml
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch

from .errors import LoraKitError
from .hardware import Hardware, detect_hardware


def state():
    """accelerate's ``PartialState`` for this process: its index, the process count, the backend and device."""
    from accelerate import PartialState
    from transformers import TrainingArguments

    check_processes(
        int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        "The launcher (accelerate launch --num_processes, torchrun --nproc_per_node) started {n} processes on this machine",
    )
    if fsdp() and not torch.cuda.is_available():
        # accelerate shards with FSDP only on GPUs: on a CPU it would quietly train unsharded copies instead.
        raise LoraKitError(
            "The launch asks for FSDP (an accelerate config with distributed_type: FSDP, or --use_fsdp), which "
            "shards the model over GPUs, and this machine has none. On CPUs, launch data parallel instead: "
            "accelerate launch --config_file configs/accelerate/ddp.yaml ..., or lora-kit train CONFIG --processes N."
        )
    return PartialState(
        # Without a GPU, accelerate takes processes launched together for separate runs unless told cpu=True.
        cpu=not torch.cuda.is_available(),
        # The Trainer's wait (ddp_timeout), as this call may be the one that joins the processes: the others wait
        # at the first step while the main process evaluates the base alone.
        timeout=timedelta(seconds=TrainingArguments.ddp_timeout),
    )


def fsdp() -> bool:
    """True in a run launched with FSDP (an accelerate config with distributed_type: FSDP, or --use_fsdp)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp(method: str, precision: str, tile_layers: bool = False) -> None:
    """Refuse, under FSDP, what it cannot shard or what lora_kit has not trained sharded (nothing outside FSDP)."""
    if not fsdp():
        return
    instead = (
        "Launch data parallel instead (every GPU holds the whole model): accelerate launch --config_file "
        "configs/accelerate/ddp.yaml ..., or lora-kit train CONFIG --processes N."
    )
    if method == "lora8":
        raise LoraKitError(
            "FSDP cannot shard an 8-bit base: bitsandbytes stores its weights as int8, and FSDP shards floating-point "
            f"tensors only (4-bit ones are stored in the compute dtype for it). Use method 'qlora' to shard. {instead}"
        )
    if precision != "bf16":
        raise LoraKitError(
            f"FSDP with {precision}: lora_kit shards bf16 runs only (GPUs of compute capability 8.0 or newer), where "
            f"the base, its 4-bit storage and the adapters share one dtype, as FSDP's flat shards need. {instead}"
        )
    if tile_layers:
        raise LoraKitError(
            "tile_layers=True under FSDP: a tiled MLP recomputes its tile with the layer's own parameters, which "
            "FSDP replaces by flat shards, so its adapters would get no gradient. Set train.tile_layers: false."
        )


def is_main_process() -> bool:
    """True in the one process that evaluates, saves, merges and reports (the only one when nothing was launched)."""
    return state().is_main_process


def processes() -> int:
    """How many processes train together (1 when nothing was launched)."""
    return state().num_processes


def setup() -> str:
    """The processes, their backend and device, e.g. '2 processes (gloo, CPU)'."""
    s = state()
    return f"{s.num_processes} processes ({s.backend}, {'GPU' if s.device.type == 'cuda' else s.device.type.upper()})"


@contextlib.contextmanager
def main_process_first():
    """The main process runs the block first and the others after it: it fills a cache that they then read."""
    with state().main_process_first():
        yield


@contextlib.contextmanager
def main_process_speaks():
    """Within the block, only the main process prints: the others would repeat its lines word for word."""
    if is_main_process():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def split_batch(micro: int, accum: int, processes: int) -> tuple[int, int]:
    """The micro-batch and accumulation each of ``processes`` processes runs for a step as large as one process's.

    accelerate gives every process micro-batches of its own, so a step holds micro-batch x processes x accumulation.
    Accumulation is divided first (a process's memory stays as it was), then the micro-batch; when neither divides,
    both stay and the step holds ``processes`` times as much.
    """
    if accum % processes == 0:
        return micro, accum // processes
    if micro % processes == 0:
        return micro // processes, accum
    return micro, accum


def batch_report(micro: int, accum: int, processes: int, one_process: int, setup: str, unit: str = "examples") -> str:
    """One line: the global batch of a step, and whether it is the one a single process would take."""
    step = micro * processes * accum
    line = f"{setup}: micro-batch {micro} x {processes} processes x grad accumulation {accum} = {step} {unit} per step"
    if step == one_process:
        return f"{line}, same as one process"
    return (
        f"{line}, {processes} times one process's {one_process}: neither gradient_accumulation_steps={accum} nor "
        f"micro_batch_size={micro} divides by {processes}. To keep one process's batch, make one of them a multiple "
        f"of {processes}."
    )


def keep_one_process_batch(micro: int, accum: int, unit: str = "examples") -> tuple[int, int, str | None]:
    """``split_batch`` for the processes of this run, with its ``batch_report`` (None when there is one process)."""
    n = processes()
    if n == 1:
        return micro, accum, None
    split_micro, split_accum = split_batch(micro, accum, n)
    return split_micro, split_accum, batch_report(split_micro, split_accum, n, micro * accum, setup(), unit)


def check_processes(n: int, asked: str, hardware: Hardware | None = None) -> None:
    """Refuse ``n`` processes on this machine where they cannot run; ``asked`` says who asked, with ``{n}``."""
    asked = asked.format(n=n)
    if n < 1:
        raise LoraKitError(f"{asked}: the count must be 1 or more (one process per GPU, e.g. 2).")
    hardware = hardware or detect_hardware()
    if hardware.device == "cuda" and n > hardware.gpu_count:
        gpus = f"{hardware.gpu_count} GPU{'s' if hardware.gpu_count > 1 else ''}"
        raise LoraKitError(
            f"{asked}, but this machine has {gpus} ({hardware.name}) and each process trains on a GPU of its own. "
            f"Use {hardware.gpu_count} processes or fewer here; for more, add machines "
            "(configs/accelerate/multi-node.yaml)."
        )


def launch_command(n: int, lora_kit_args: list[str], hardware: Hardware | None = None) -> list[str]:
    """The ``accelerate launch`` command that runs ``python -m lora_kit <lora_kit_args>`` in ``n`` processes here."""
    if "WORLD_SIZE" in os.environ:
        raise LoraKitError(
            f"--processes {n} inside a launched run (WORLD_SIZE={os.environ['WORLD_SIZE']}): the launcher already "
            "started the processes. Drop --processes, or run lora-kit without accelerate launch."
        )
    hardware = hardware or detect_hardware()
    check_processes(n, "--processes {n}", hardware)
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        "--multi_gpu",  # accelerate's torchrun launcher; without a GPU the processes pair up over gloo (see state)
        f"--num_processes={n}",
        "--num_machines=1",
        "--mixed_precision=no",  # lora_kit's trainer sets bf16 or fp16 from the GPU itself
        "--dynamo_backend=no",  # lora_kit's speed levers decide what is compiled
        "--main_process_port=0",  # a free port: two runs on one machine do not collide
    ]
    if hardware.device == "cpu":
        # The cores shared out between the processes; torchrun's default is one thread each.
        command.append(f"--num_cpu_threads_per_process={max(1, torch.get_num_threads() // n)}")
    return [*command, "-m", "lora_kit", *lora_kit_args]


def train_in_processes(settings, n: int, config_path, merge: bool = True, log=print) -> dict:
    """Train ``settings`` (a CourseSettings) in ``n`` processes from a notebook: the knobs are written as a lora-kit
    config at ``config_path`` and ``lora-kit train CONFIG --processes n`` runs it, its output passed to ``log`` line
    by line (a notebook shows a child process's output only this way). Returns the run's results (its JSON line)."""
    from .config import config_text
    from .files import atomic_file

    config_path = Path(config_path)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(config_path) as partial:
        partial.write_text(config_text(settings, f"Written by train_in_processes for {n} processes."))
    command = [sys.executable, "-m", "lora_kit", "train", str(config_path), f"--processes={n}"]
    command += [] if merge else ["--no-merge"]
    result = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            if line.startswith('{"model"'):  # the main process's results, the run's last word
                result = json.loads(line)
            else:
                log(line.rstrip("\n"))
    if proc.returncode != 0 or result is None:
        raise LoraKitError(
            f"The run of {config_path} in {n} processes ended with exit status {proc.returncode} and no results; "
            "its output above says why. The same command in a terminal: " + " ".join(command)
        )
    return result


__all__ = [
    "state",
    "fsdp",
    "check_fsdp",
    "is_main_process",
    "processes",
    "setup",
    "main_process_first",
    "main_process_speaks",
    "split_batch",
    "batch_report",
    "keep_one_process_batch",
    "check_processes",
    "launch_command",
    "train_in_processes",
]
