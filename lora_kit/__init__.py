"""lora_kit: LoRA and QLoRA fine-tuning of chat models, in a few readable calls.

    model, tokenizer = load_model("embedded", quantization="nf4")
    train_ds, eval_ds = demo_task()
    trainer = build_trainer(model, tokenizer, train_ds, lora=preset("qlora").lora, train=...)
    lora_kit.train.train(trainer)   # trainer.train(), resuming from the newest complete checkpoint

Every function returns the ecosystem's own objects (PreTrainedModel, PeftModel, SFTTrainer,
Dataset), so you can always drop down a level.
"""

from .data import demo_task, json_exact_match, split_train_eval, tokenize_conversations
from .errors import DataFormatError, LoraKitError
from .evaluate import GenerationSettings, adapter_disabled, compare_answers, generate, perplexity, task_score
from .formats import load_data
from .hardware import describe, detect_hardware
from .chat import ChatSession, chat_box
from .hub import push_to_hub
from .merge import compare_merge_bases, merge_adapter, merge_in_place, save_adapter
from .models import embedded_model_path, load_model, load_tokenizer
from .train import LoraSettings, Recipe, TrainSettings, add_lora, build_trainer, find_target_modules, preset

__version__ = "0.1.0"
__all__ = [
    "load_model",
    "load_tokenizer",
    "embedded_model_path",
    "load_data",
    "demo_task",
    "split_train_eval",
    "tokenize_conversations",
    "json_exact_match",
    "LoraSettings",
    "TrainSettings",
    "Recipe",
    "preset",
    "find_target_modules",
    "add_lora",
    "build_trainer",
    "perplexity",
    "generate",
    "task_score",
    "compare_answers",
    "GenerationSettings",
    "adapter_disabled",
    "save_adapter",
    "merge_adapter",
    "merge_in_place",
    "describe",
    "compare_merge_bases",
    "push_to_hub",
    "chat_box",
    "ChatSession",
    "detect_hardware",
    "LoraKitError",
    "DataFormatError",
]
