"""Several processes, one run: 2 CPU processes (gloo) train as one process would, and only the main one writes."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kit import distributed
from lora_kit.errors import LoraKitError
from lora_kit.hardware import Hardware

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
SHORT = ["train.max_steps=3", "data.n_train=16", "data.n_eval=4", "eval.eval_samples=4", "eval.max_new_tokens=8"]
CPU = Hardware(device="cpu", name="CPU", compute_capability=None, vram_gib=None, gpu_count=0)
TWO_GPUS = Hardware(device="cuda", name="NVIDIA H200", compute_capability=(9, 0), vram_gib=139.8, gpu_count=2)


def command(*args, timeout=300, cwd=ROOT):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def short_run(out_dir) -> list[str]:
    """The demo config shrunk to 3 steps, no merge, writing to ``out_dir``."""
    return ["train", DEMO, "--no-merge", *(f"--set={s}" for s in [*SHORT, f"output_dir={out_dir}"])]


def report(stdout: str) -> dict:
    """The one JSON line a run ends with (the main process's); fails unless there is exactly one."""
    lines = [line for line in stdout.splitlines() if line.startswith('{"model"')]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def losses(out_dir: Path) -> list[float]:
    (state,) = out_dir.glob("checkpoints-*/checkpoint-3/trainer_state.json")
    return [h["loss"] for h in json.loads(state.read_text())["log_history"] if "loss" in h]


def assert_one_adapter(out_dir: Path) -> None:
    """One adapter, written once: nothing beside it but the checkpoints, no half-written or moved-aside folder."""
    entries = sorted(p.name for p in out_dir.iterdir())
    assert len(entries) == 2 and entries[0] == "adapter" and entries[1].startswith("checkpoints-"), entries
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(out_dir / "adapter")
    assert model.peft_config["default"].r == 16


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    proc = command(sys.executable, "-m", "lora_kit", *short_run(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, report(proc.stdout)


def test_two_cpu_processes_train_as_one_and_only_the_main_one_writes(tmp_path, one_process):
    # As a notebook launches them: its knobs written as a config, lora-kit train --processes 2 run on it.
    from lora_kit.config import load_config

    settings = load_config(DEMO, [*SHORT, f"output_dir={tmp_path}"])
    lines = []
    result = distributed.train_in_processes(settings, 2, tmp_path / "recipe.yaml", merge=False, log=lines.append)
    out = "\n".join(lines)
    assert "lora-kit train: 2 processes, launched as: " in out and "accelerate.commands.launch" in out
    shared = "2 processes (gloo, CPU): micro-batch 2 x 2 processes x grad accumulation 1 = 4 examples per step"
    assert f"{shared}, same as one process" in out
    assert "process 1, one of 2 processes (gloo, CPU): trained 3 steps" in out  # the second rank took part
    assert out.count("[lora_kit] before:") == 1  # only the main process evaluates
    assert result["processes"] == 2 and result["steps"] == 3
    (tmp_path / "recipe.yaml").unlink()  # the config the run read, beside its outputs
    assert_one_adapter(tmp_path)
    (checkpoint,) = tmp_path.glob("checkpoints-*/checkpoint-3")
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()

    # The same recipe in one process: same examples per step, so the same numbers up to float rounding.
    one_dir, one = one_process
    assert one["processes"] == 1
    assert result["before_perplexity"] == one["before_perplexity"]  # the same model, evaluated once, the same way
    assert result["after_perplexity"] == pytest.approx(one["after_perplexity"], rel=1e-3)
    two_losses = losses(tmp_path)
    assert len(two_losses) == 3 and all(math.isfinite(x) for x in two_losses)
    assert two_losses == pytest.approx(losses(one_dir), rel=1e-3)


def test_a_second_machine_joins_the_first(tmp_path):
    """Two accelerate launches of one process each meet at machine 0's address, as two machines would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "configs" / "accelerate" / "multi-node.yaml"), "--num_processes=2"]
    launch += ["--main_process_ip=127.0.0.1", f"--main_process_port={port}"]
    run = ["-m", "lora_kit", *short_run(tmp_path)]
    first = subprocess.Popen(
        [*launch, "--machine_rank=0", *run], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    second = command(*launch, "--machine_rank=1", *run)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (err[-2000:], second.stderr[-2000:])
    assert report(out)["processes"] == 2
    assert "process 1, one of 2 processes (gloo, CPU): trained 3 steps" in second.stdout
    assert '{"model"' not in second.stdout  # the second machine trains, and reports nothing else
    assert_one_adapter(tmp_path)


@pytest.mark.parametrize(
    "micro, accum, n, expected",
    [
        (2, 4, 2, (2, 2)),  # accumulation divides: each process keeps its micro-batch
        (4, 1, 2, (2, 1)),  # the demo's 4 x 1: the micro-batch is split instead
        (1, 8, 4, (1, 2)),
        (1, 8, 3, (1, 8)),  # neither divides: the step grows 3 times
        (3, 1, 2, (3, 1)),
    ],
)
def test_the_batch_is_split_to_keep_one_process_step(micro, accum, n, expected):
    assert distributed.split_batch(micro, accum, n) == expected


def test_the_batch_line_says_what_a_step_holds():
    same = distributed.batch_report(2, 2, 2, 8, "2 processes (gloo, CPU)")
    assert same == (
        "2 processes (gloo, CPU): micro-batch 2 x 2 processes x grad accumulation 2 = 8 examples per step, "
        "same as one process"
    )
    grown = distributed.batch_report(1, 8, 3, 8, "3 processes (nccl, GPU)")
    assert "= 24 examples per step, 3 times one process's 8" in grown
    assert "neither gradient_accumulation_steps=8 nor micro_batch_size=1 divides by 3" in grown
    assert "make one of them a multiple of 3" in grown


def test_without_a_launch_this_process_is_the_only_one():
    assert distributed.processes() == 1 and distributed.is_main_process()
    assert distributed.keep_one_process_batch(4, 2) == (4, 2, None)


def test_more_processes_than_gpus_is_refused_with_what_to_do():
    with pytest.raises(LoraKitError) as err:
        distributed.check_processes(4, "--processes {n}", TWO_GPUS)
    message = str(err.value)
    assert "--processes 4" in message and "2 GPUs (NVIDIA H200)" in message
    assert "Use 2 processes or fewer here" in message and "multi-node.yaml" in message
    distributed.check_processes(2, "--processes {n}", TWO_GPUS)
    distributed.check_processes(4, "--processes {n}", CPU)  # on a CPU the processes share the cores


def test_a_launch_of_more_processes_than_gpus_stops_before_accelerate_starts(monkeypatch):
    monkeypatch.setattr(distributed, "detect_hardware", lambda: TWO_GPUS)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(LoraKitError, match=r"started 4 processes on this machine, but this machine has 2 GPUs"):
        distributed.state()


def test_fsdp_asked_for_on_a_cpu_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for an FSDP config
    with pytest.raises(LoraKitError, match=r"asks for FSDP.*this machine has none.*configs/accelerate/ddp.yaml"):
        distributed.state()


def test_fsdp_refuses_what_it_cannot_shard_before_a_model_loads(monkeypatch):
    distributed.check_fsdp("lora8", "fp16", tile_layers=True)  # not launched with FSDP: nothing to refuse
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LoraKitError, match=r"cannot shard an 8-bit base.*int8.*Use method 'qlora'.*ddp.yaml"):
        distributed.check_fsdp("lora8", "bf16")
    with pytest.raises(LoraKitError, match=r"FSDP with fp16: lora_kit shards bf16 runs only.*--processes N"):
        distributed.check_fsdp("qlora", "fp16")
    with pytest.raises(LoraKitError, match=r"tile_layers=True under FSDP.*no gradient.*train.tile_layers: false"):
        distributed.check_fsdp("qlora", "bf16", tile_layers=True)
    distributed.check_fsdp("qlora", "bf16")
    distributed.check_fsdp("lora", "bf16")
    from lora_kit.models import load_model

    with pytest.raises(LoraKitError, match="cannot shard an 8-bit base"):  # refused before anything is read
        load_model("no/such-model", "8bit", precision="bf16", hardware=TWO_GPUS)


def test_the_launch_command_runs_lora_kit_through_accelerate(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    launched = distributed.launch_command(2, ["train", "my.yaml"], CPU)
    assert launched[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes=2" in launched
    assert launched[-4:] == ["-m", "lora_kit", "train", "my.yaml"]
    with pytest.raises(LoraKitError, match="2 GPUs"):
        distributed.launch_command(3, ["train", "my.yaml"], TWO_GPUS)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LoraKitError, match="the launcher already started the processes"):
        distributed.launch_command(2, ["train", "my.yaml"], CPU)


def test_cli_refuses_a_bad_process_count_before_loading_anything(tmp_path):
    proc = command(sys.executable, "-m", "lora_kit", *short_run(tmp_path), "--processes", "0", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--processes 0: the count must be 1 or more" in proc.stderr
    nested = subprocess.run(
        [sys.executable, "-m", "lora_kit", *short_run(tmp_path), "--processes", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "WORLD_SIZE": "2"},
    )
    assert nested.returncode == 2 and "the launcher already started the processes" in nested.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
