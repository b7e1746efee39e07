"""The main job: fine-tune a model as its knobs say, and prove it worked.

    python -m lora_kit demo              # the embedded model learns the demo task, offline, on a CPU
    lora-kit train configs/qlora-t4.yaml # any run a config describes

It measures the held-out task score and perplexity before and after training, saves the adapter,
merges it into the base's own 16-bit weights (streamed, each weight checked as written; the
logits compared where the model fits memory) and ends with one JSON line of results.

Launched in several processes (``lora-kit train ... --processes 2``, or ``accelerate launch``),
every process trains and only the main process evaluates, saves, merges and reports.
"""

from __future__ import annotations

import time

import torch

from .config import CPU
from .course import CourseSettings, course_settings, load_course_data, scorer_for, system_prompt


def demo_settings(method: str = "lora", **overrides) -> CourseSettings:
    """The demo's knobs (configs/demo.yaml): the notebooks' CPU recipe on any machine (the embedded model and
    the demo task), in outputs/demo, trained from scratch each time; ``overrides`` replace knobs by name."""
    own = {
        "output_dir": ("outputs/demo", "the demo's folder"),
        "resume": (False, "the demo trains from scratch every time: it is the proof that training works"),
    }
    knobs = {name: value for name, (value, _) in own.items()}
    settings = course_settings(method, smoke=False, hardware=CPU, **{**knobs, **overrides})
    for name, (_, why) in own.items():
        if name not in overrides:
            settings.reasons[name] = why
    return settings


def run(settings: CourseSettings, merge: bool = True, log=print) -> dict | None:
    """Evaluate, train, evaluate, save the adapter and (``merge``) write the merged model; return the numbers.

    In a launched run of several processes all of them train; the main process alone measures, writes and returns
    the numbers, and the others return None once training is done.
    """
    from . import distributed, evaluate, merge as merging, models, train

    t0 = time.time()
    main = distributed.is_main_process()
    train_ds, eval_ds = load_course_data(settings)
    with distributed.main_process_first():  # the embedded model is converted once, by the main process
        models.resolve_model_name(settings.model)
    model, tokenizer = models.load_model(settings.model, settings.quantization)
    model = train.add_lora(model, settings.lora)
    name, scorer = scorer_for(settings)
    sample = eval_ds.select(range(min(settings.eval_samples, len(eval_ds))))
    gen = evaluate.GenerationSettings(max_new_tokens=settings.max_new_tokens)

    def measure(model):
        score = evaluate.task_score(model, tokenizer, sample, scorer=scorer, settings=gen, batch_size=len(sample))
        return score.score, evaluate.perplexity(model, eval_ds, tokenizer, max_length=settings.max_length)

    if main:
        log(
            f"[lora_kit] {settings.method}: {model.get_nb_trainable_parameters()[0]:,} trainable parameters; "
            "evaluating the base"
        )
        before, before_ppl = measure(model)
        log(f"[lora_kit] before: {name} {before:.3f}, perplexity {before_ppl:.3f}")
    with distributed.main_process_speaks():
        trainer = train.build_trainer(model, tokenizer, train_ds, lora=settings.lora, train=settings.train)
        t_train = time.time()
        train.train(trainer, resume=settings.resume)
    train_seconds = time.time() - t_train
    steps, processes = trainer.state.global_step, trainer.args.world_size
    # this process's GPU memory peak while training (train.train resets the count as training starts)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    # Under FSDP each process holds a shard of the adapters, and the sharded model runs only with every process
    # taking part: all of them gather the adapters to the main process, which puts them in a model of its own.
    model = _unsharded(trainer, settings) if distributed.fsdp() else trainer.model
    if not main:
        log(
            f"[lora_kit] process {trainer.args.process_index}, one of {distributed.setup()}: trained "
            f"{steps} steps{f' (GPU memory peak {peak} GiB)' if peak else ''}; the main process evaluates, saves "
            "and reports"
        )
        return None
    after, after_ppl = measure(model)
    log(f"[lora_kit] after {steps} steps ({train_seconds:.0f} s): {name} {after:.3f}, perplexity {after_ppl:.3f}")

    metrics = {
        "score": name,
        "before_score": before,
        "after_score": after,
        "before_perplexity": round(before_ppl, 4),
        "after_perplexity": round(after_ppl, 4),
    }
    card = {
        "base_model": settings.model,
        "method": settings.method,
        "steps": steps,
        "metrics": metrics,
        "lora": {"r": settings.r, "alpha": settings.alpha, "targets": settings.target_modules},
        "data": f"{settings.dataset} ({len(train_ds)} train / {len(eval_ds)} held out)",
    }
    adapter_dir = merging.save_adapter(model, tokenizer, settings.adapter_dir, card)
    result = {
        "model": settings.model,
        "method": settings.method,
        "steps": steps,
        "processes": processes,
        "train_seconds": round(train_seconds, 1),
        "train_peak_gib": peak,
        **metrics,
        "adapter_dir": str(adapter_dir),
    }
    merging.free_memory(trainer, model)
    del trainer, model
    merging.free_memory()
    if merge:
        check = merging.merge_adapter(adapter_dir, settings.merged_dir, base="original", card=card)
        result.update(
            merged_dir=str(settings.merged_dir),
            merged_matches_adapter=check.ok,  # every weight read back; the logits too where logits_checked
            merge_logits_checked=check.logits_checked,  # False where an fp32 copy does not fit (a 7B on a T4)
            merge_max_rel_diff=check.max_rel_diff,
        )
        result.update(_export(settings, log))
    result["total_seconds"] = round(time.time() - t0, 1)
    return result


def _unsharded(trainer, settings: CourseSettings):
    """The trained adapters of an FSDP run in a whole model on the main process (None in the others).

    Every process must call it: the gathering is collective. The main process then frees the sharded training
    model and loads the base once more, whole, with the gathered adapter weights in it.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from . import distributed, merge as merging, models, train

    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if peft_model is trainer.model:  # a finished run, loaded: never sharded
        return trainer.model if distributed.is_main_process() else None
    whole = trainer.accelerator.get_state_dict(trainer.model)  # the full state dict, on the main process only
    if not distributed.is_main_process():
        return None
    adapters = get_peft_model_state_dict(peft_model, state_dict=whole)
    del whole
    merging.free_memory(trainer)
    model, _ = models.load_model(settings.model, settings.quantization)
    model = train.add_lora(model, settings.lora)
    set_peft_model_state_dict(model, adapters)
    return model


def _export(settings: CourseSettings, log) -> dict:
    """The merged model as an f16 GGUF file with an Ollama Modelfile beside it, for llama.cpp and Ollama.

    A failure here (no converter offline, an architecture llama.cpp cannot convert) is reported in the
    results and leaves the trained adapter and merged model as they are.
    """
    from .errors import LoraKitError
    from .export import export_gguf, write_modelfile

    t0 = time.time()
    try:
        gguf = export_gguf(settings.merged_dir, settings.merged_dir.parent / "model-f16.gguf", "f16")
        modelfile = write_modelfile(gguf, system=system_prompt(settings))  # the prompt it was trained with
    except LoraKitError as err:
        log(f"[lora_kit] GGUF export skipped: {err}")
        return {"gguf": None, "gguf_error": str(err)}
    log(f"[lora_kit] GGUF: {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB), Ollama: ollama create NAME -f {modelfile}")
    return {"gguf": str(gguf), "modelfile": str(modelfile), "gguf_seconds": round(time.time() - t0, 1)}
