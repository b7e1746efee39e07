"""Nothing the user made is lost, and an interrupted run continues to the same result.

The fault-injection tests run a worker in a subprocess, SIGKILL it at a chosen stage (or at a
random moment of training), then do what a user would: run the same thing again.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lora_kit import (
    LoraSettings,
    TrainSettings,
    add_lora,
    build_trainer,
    demo_task,
    load_data,
    load_model,
    save_adapter,
)
from lora_kit.errors import LoraKitError
from lora_kit.files import MARKER, atomic_folder, clean_stale_partials
from lora_kit.train import find_checkpoint

REPO = Path(__file__).resolve().parents[1]

# The worker: train a few steps (resuming when checkpoints exist) and save the adapter, or only
# save a freshly drawn adapter, or convert the embedded model. FAULT picks where it kills itself.
WORKER = r"""
import os, signal, sys
from pathlib import Path

mode, out = sys.argv[1], Path(sys.argv[2])
fault = os.environ.get("FAULT", "")

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if fault.startswith("state:"):  # in trainer_state.json of checkpoint-N: half of it written
    from transformers import TrainerState
    real_state = TrainerState.save_to_json
    def half_state(self, path):
        if path.endswith(f"checkpoint-{fault[6:]}/trainer_state.json"):
            real_state(self, path)
            Path(path).write_text(Path(path).read_text()[:40])
            die()
        real_state(self, path)
    TrainerState.save_to_json = half_state
if fault.startswith("weights:"):  # checkpoint-N holds its weights, not yet its optimizer or state
    from transformers import Trainer
    real_opt = Trainer._save_optimizer_and_scheduler
    def after_weights(self, output_dir):
        if output_dir.endswith(f"checkpoint-{fault[8:]}"):
            die()
        real_opt(self, output_dir)
    Trainer._save_optimizer_and_scheduler = after_weights
if fault in ("write", "convert"):  # the weights of the new output are written, nothing after
    import transformers
    real_save = transformers.PreTrainedModel.save_pretrained
    def save_then_die(self, *a, **k):
        real_save(self, *a, **k)
        die()
    transformers.PreTrainedModel.save_pretrained = save_then_die
    import peft
    real_peft_save = peft.PeftModel.save_pretrained
    def peft_save_then_die(self, *a, **k):
        real_peft_save(self, *a, **k)
        die()
    peft.PeftModel.save_pretrained = peft_save_then_die
if fault == "swap":  # the previous output moved aside, the new one not yet renamed into place
    real_replace, moved_aside = os.replace, []
    def replace_then_die(a, b):
        if moved_aside:
            die()
        real_replace(a, b)
        moved_aside.extend([b] if ".old-" in str(b) else [])
    os.replace = replace_then_die

from lora_kit import LoraSettings, TrainSettings, build_trainer, demo_task, load_model, save_adapter
from lora_kit.models import embedded_model_path
from lora_kit.train import add_lora, seed_fresh_adapters, train

if mode == "convert":
    print(embedded_model_path(), flush=True)
    sys.exit(0)
model, tok = load_model("embedded")
if mode == "save":  # an untrained adapter drawn from the seed in argv[3]
    model = add_lora(model, LoraSettings(r=4, alpha=8))
    seed_fresh_adapters(model, int(sys.argv[3]))
    save_adapter(model, tok, out)
    sys.exit(0)

from transformers import TrainerCallback

class Progress(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"STEP {state.global_step}", flush=True)

data, _ = demo_task(12, 1)
settings = TrainSettings(max_steps=4, save_steps=2, micro_batch_size=1, gradient_accumulation_steps=1,
                         learning_rate=1e-3, max_length=64, gradient_checkpointing=False, report_to="none",
                         output_dir=str(out / "run"), seed=7)
trainer = build_trainer(model, tok, data, lora=LoraSettings(r=4, alpha=8, dropout=0.1), train=settings)
trainer.add_callback(Progress())
train(trainer)
save_adapter(trainer.model, tok, out / "adapter")
print("FINISHED", flush=True)
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # As in the workers: on a shared 2-core machine, two torch threads per process mostly wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FAULT", "PYTHONPATH")}
    # One thread: the same arithmetic in every run, and fair to a shared machine.
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _worker(mode: str, out: Path, *args, fault: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(out), *map(str, args)],
        env=_env(FAULT=fault, **(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _killed(result) -> None:
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def _finished(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _adapter_bytes(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """The adapter of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    _finished(_worker("train", out))
    return _adapter_bytes(out / "adapter")


# --- Training: kill, rerun, same adapter bit for bit -------------------------------------------------------------


def test_the_run_seed_decides_the_adapters_first_values(tmp_path):
    # PEFT draws lora_A in add_lora, before the Trainer seeds anything; build_trainer draws it again from the seed.
    first = []
    for unrelated_seed in (1, 2):
        model, tok = load_model("embedded")
        torch.manual_seed(unrelated_seed)
        model = add_lora(model, LoraSettings(r=2, target_modules="attention"))
        settings = TrainSettings(max_steps=1, max_length=128, report_to="none", output_dir=str(tmp_path), seed=7)
        trainer = build_trainer(model, tok, demo_task(4, 1)[0], train=settings)
        first.append({k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_A" in k})
    assert first[0].keys() == first[1].keys() and len(first[0]) == 60
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])


@pytest.mark.parametrize(
    "fault,skipped",
    [
        ("weights:4", "checkpoint-4: it has no trainer_state.json"),  # mid-checkpoint: resume from checkpoint-2
        ("state:2", "checkpoint-2: its trainer_state.json is cut short"),  # no complete checkpoint: start again
    ],
)
def test_kill_during_a_checkpoint_then_rerun_gives_the_same_adapter(reference, tmp_path, fault, skipped):
    _killed(_worker("train", tmp_path, fault=fault))
    run = tmp_path / "run"
    incomplete = sorted(p.name for p in run.iterdir())
    result = _worker("train", tmp_path)
    _finished(result)
    assert skipped in result.stdout
    assert ("Resuming from" in result.stdout) == (fault != "state:2")
    assert _adapter_bytes(tmp_path / "adapter") == reference
    assert set(incomplete) <= {p.name for p in run.iterdir()}  # the rerun deleted none of the checkpoints


def test_kill_at_a_random_moment_of_training_then_rerun_gives_the_same_adapter(reference, tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    kill_after_step, delay = rng.randint(1, 2), rng.uniform(0, 1.0)  # steps take ~1 s: the run is still going
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, "train", str(tmp_path)],
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        for line in proc.stdout:
            if line.strip() == f"STEP {kill_after_step}":
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    where = f"killed {delay:.2f} s after step {kill_after_step} (seed {seed})"
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it was {where}"
    result = _worker("train", tmp_path)
    _finished(result)
    assert _adapter_bytes(tmp_path / "adapter") == reference, where


def test_a_finished_run_started_again_trains_no_step_more(reference, tmp_path):
    # transformers checks for the last step only after taking one: resumed from its last checkpoint, a finished run
    # would train a fifth step and change its adapter each time the notebook is run again.
    _finished(_worker("train", tmp_path))
    again = _worker("train", tmp_path)
    _finished(again)
    assert "holds all 4 steps of this run" in again.stdout and "STEP" not in again.stdout
    assert _adapter_bytes(tmp_path / "adapter") == reference
    assert sorted(p.name for p in (tmp_path / "run").rglob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_resume_picks_the_newest_complete_checkpoint_and_deletes_nothing(tmp_path):
    for step, state in [(2, "{}"), (4, "{}"), (6, '{"global'), (8, None)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"0")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-10").mkdir()  # only a folder
    checkpoint, skipped = find_checkpoint(str(tmp_path))
    assert checkpoint == str(tmp_path / "checkpoint-4")
    assert [s.split("checkpoint-")[1][:2] for s in skipped] == ["10", "8:", "6:"]
    assert "interrupted" in skipped[0]
    assert len(list(tmp_path.iterdir())) == 5
    assert find_checkpoint(str(tmp_path / "missing")) == (None, [])


def test_a_checkpoint_of_an_fsdp_run_is_resumed_only_under_fsdp(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lora_kit.errors import LoraKitError
    from lora_kit.train import train

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    for name in ("adapter_model.safetensors", "pytorch_model_fsdp.bin", "trainer_state.json"):
        (folder / name).write_text("{}")
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path)))  # refused before training starts
    with pytest.raises(LoraKitError, match=r"checkpoint-4 was written by an FSDP run.*fsdp-qlora.yaml.*resume: false"):
        train(trainer)
    assert sorted(p.name for p in folder.iterdir())[1] == "pytorch_model_fsdp.bin"  # nothing deleted


def test_a_checkpoint_saved_over_an_older_one_reads_as_unfinished_until_its_state_is_written(tmp_path):
    from types import SimpleNamespace

    from lora_kit.train import CheckpointGuard

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"0")
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    guard = CheckpointGuard()
    guard.on_step_end(args, SimpleNamespace(global_step=2), SimpleNamespace(should_save=False))
    assert find_checkpoint(str(tmp_path))[0] == str(folder)  # no save at this step: untouched
    guard.on_step_end(args, SimpleNamespace(global_step=2), SimpleNamespace(should_save=True))
    assert find_checkpoint(str(tmp_path))[0] is None and (folder / "adapter_model.safetensors").is_file()


# --- Saving: the previous output or the new one, never neither -------------------------------------------------


def test_kill_during_a_save_keeps_the_previous_output_and_the_rerun_finishes(tmp_path):
    target = tmp_path / "adapter"
    _finished(_worker("save", target, 1))
    previous = _adapter_bytes(target)
    _killed(_worker("save", target, 2, fault="write"))  # new weights written, not yet in place
    assert _adapter_bytes(target) == previous and len(_hidden(tmp_path)) == 1
    _killed(_worker("save", target, 2, fault="swap"))  # killed between the renames
    assert not target.exists() and len(_hidden(tmp_path)) == 2  # the previous output is only under a hidden name
    clean_stale_partials(target)  # what the next save does first
    assert _adapter_bytes(target) == previous and _hidden(tmp_path) == []
    _killed(_worker("save", target, 2, fault="swap"))
    _finished(_worker("save", target, 2))
    assert _adapter_bytes(target) != previous and (target / MARKER).is_file()
    assert _hidden(tmp_path) == []


def test_kill_during_the_embedded_conversion_leaves_nothing_after_the_rerun(tmp_path):
    cache = {"LORA_KIT_CACHE": str(tmp_path)}
    _killed(_worker("convert", tmp_path, fault="convert", env=cache))
    assert len(_hidden(tmp_path)) == 1 and not (tmp_path / "SmolLM2-135M-Instruct").exists()
    _finished(_worker("convert", tmp_path, env=cache))
    folder = tmp_path / "SmolLM2-135M-Instruct"
    assert _hidden(tmp_path) == [] and (folder / "model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        p.name: 0o666 & ~umask for p in folder.iterdir()
    }  # readable by others sharing the cache


# --- Saving never deletes what lora_kit did not write --------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_model():
    model, tok = load_model("embedded")
    return add_lora(model, LoraSettings(r=2, target_modules="attention")), tok


def test_save_refuses_a_folder_holding_user_files_and_keeps_them(peft_model, tmp_path):
    model, tok = peft_model
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.jsonl").write_text("{}\n")
    with pytest.raises(LoraKitError, match=r"'.*project'.*train\.jsonl.*new or empty folder"):
        save_adapter(model, tok, project)
    assert [p.name for p in project.iterdir()] == ["train.jsonl"] and _hidden(tmp_path) == []


def test_save_replaces_its_own_output_but_not_files_added_to_it(peft_model, tmp_path):
    model, tok = peft_model
    target = tmp_path / "adapter"
    save_adapter(model, tok, target)
    recorded = json.loads((target / MARKER).read_text())["files"]
    assert "adapter_model.safetensors" in recorded and MARKER not in recorded
    save_adapter(model, tok, target)  # a lora_kit output: replaced
    (target / "notes.txt").write_text("mine")
    with pytest.raises(LoraKitError, match=r"earlier lora_kit output.*notes\.txt"):
        save_adapter(model, tok, target)
    assert (target / "notes.txt").read_text() == "mine"


def test_save_refuses_the_current_folder_and_its_parents(peft_model, tmp_path, monkeypatch):
    model, tok = peft_model
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for target in (".", "..", str(work)):
        with pytest.raises(LoraKitError, match="current folder or one above it"):
            save_adapter(model, tok, target)
    assert list(work.iterdir()) == [] and _hidden(tmp_path) == []


def test_an_output_that_holds_the_input_is_refused(tmp_path):
    # merge_adapter("run/final_adapter", "run") must not replace the folder holding its adapter.
    adapter = tmp_path / "run" / "final_adapter"
    with atomic_folder(adapter) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    for target in (tmp_path / "run", adapter):
        with pytest.raises(LoraKitError, match="which this save reads from"):
            with atomic_folder(target, inputs=(adapter,)):
                pass
    assert (adapter / "adapter_config.json").is_file()


# --- Settings and data are checked before any model work ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_length": -5}, "max_length"),
        ({"max_steps": 0, "num_epochs": 0}, "max_steps"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"warmup_ratio": 5}, "warmup_ratio"),
        ({"optim": "adam"}, "optim"),
        ({"save_steps": 0}, "save_steps"),
        ({"seed": -1}, "seed"),
        ({"lr_scheduler_type": "cosinus"}, "lr_scheduler_type"),
    ],
)
def test_train_settings_name_the_field_value_and_what_is_allowed(kwargs, field):
    with pytest.raises(LoraKitError, match=rf"TrainSettings\.{field}={list(kwargs.values())[0]!r}: .*(must|Use)"):
        TrainSettings(**kwargs)


def test_raw_text_trains_as_continued_pretraining(peft_model, tmp_path):
    model, tok = peft_model
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The river Nile flows north through eleven countries. " * 20)
    (docs / "b.md").write_text("# Notes\nLoRA adds a low-rank update to frozen weights. " * 20)
    data = load_data(docs, text_chunk_tokens=40, text_overlap_tokens=0)
    settings = TrainSettings(
        max_steps=2,
        micro_batch_size=2,
        gradient_accumulation_steps=1,
        max_length=48,
        gradient_checkpointing=False,
        report_to="none",
        output_dir=str(tmp_path / "run"),
        save_steps=100,
        fast=False,
    )
    trainer = build_trainer(model, tok, data, train=settings)
    row = trainer.train_dataset[0]
    assert row["labels"] == row["input_ids"] and len(row["input_ids"]) <= 48  # every token is learned
    trainer.train()
    assert [h["loss"] > 0 for h in trainer.state.log_history if "loss" in h] == [True, True]
    # The fast path reads the token counts before the trainer exists; raw text once failed there.
    assert build_trainer(model, tok, data, train=replace(settings, fast=True)).train_dataset.num_rows > 0
