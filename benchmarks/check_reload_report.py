"""Does the notebooks' reload report read a harmless divergence as a near tie? (CPU, about 2 minutes)

The notebooks generate section 8's answers in left-padded batches and the reloaded adapter's answer alone; in 16-bit
arithmetic the two can part at a token where the top two logits nearly tie. ``course.reload_report`` says where they
part and whether the logit gap there is small enough for the batch shape to tip it. This script makes such
divergences on purpose: a random-weight Llama (random weights answer in garbled text, as the GPU notebooks'
checkpoints do) in bf16 on the CPU, each prompt answered in a padded batch and alone, and every pair that differs
handed to the report twice: as the token ids generated (what the notebooks pass) and as the decoded text tokenized
again. Both calls see the same model, so any verdict other than "near tie" is a misreading.

    python3 benchmarks/check_reload_report.py --prompts 32

Prints the counts as one JSON line (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def verdict(report: str) -> str:
    for kind in ("word for word", "near tie", "more than"):
        if kind in report:
            return kind
    return "other"


def random_llama(tok, hidden: int = 1024, layers: int = 8):
    """A random-weight Llama in bf16 on the CPU, with the embedded tokenizer's vocabulary. At the default size
    (about 180M parameters, most of them the vocabulary) random weights give logits of a few units; a 2-layer toy's
    are all near ties."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def chat_prompts(n: int, folder=Path("/tmp/check_reload_report")) -> list[list[dict]]:
    """The user turns of ``n`` rows of the notebooks' GPU-run chat file."""
    from notebooks_on_gpu import write_chat_file

    rows = [
        json.loads(line)["text"] for line in write_chat_file(folder / "chat.jsonl", rows=n).read_text().splitlines()
    ]
    return [[{"role": "user", "content": r.split("[INST]")[1].split("[/INST]")[0].strip()}] for r in rows]


def compare(model, tok, prompts, new_tokens: int = 64) -> dict:
    """Each prompt answered in a padded batch and alone; every pair that differs reported from ids and from text."""
    from lora_kit import course
    from lora_kit.evaluate import generate_details

    batched = generate_details(model, tok, prompts, max_new_tokens=new_tokens, batch_size=16)
    counts = {"prompts": len(prompts), "alone_equals_batched": 0, "text_tokenizes_back_to_ids": 0}
    from_ids, from_text = {}, {}
    for prompt, b in zip(prompts, batched):
        (a,) = generate_details(model, tok, [prompt], max_new_tokens=new_tokens)
        b_again = tok(b.text, add_special_tokens=False).input_ids
        counts["text_tokenizes_back_to_ids"] += b_again == b.tokens
        if a.tokens == b.tokens:
            counts["alone_equals_batched"] += 1
            continue
        kind = verdict(course.reload_report(model, tok, prompt, a.tokens, b.tokens))
        from_ids[kind] = from_ids.get(kind, 0) + 1
        a_again = tok(a.text, add_special_tokens=False).input_ids
        kind = verdict(course.reload_report(model, tok, prompt, a_again, b_again))
        from_text[kind] = from_text.get(kind, 0) + 1
    return {**counts, "verdicts_from_ids": from_ids, "verdicts_from_retokenized_text": from_text}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=None, help="a JSON file for the counts")
    args = p.parse_args(argv)

    from lora_kit import load_tokenizer

    tok = load_tokenizer("embedded")
    counts = compare(random_llama(tok), tok, chat_prompts(args.prompts), args.new_tokens)
    line = json.dumps(counts)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0 if set(counts["verdicts_from_ids"]) <= {"near tie"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
