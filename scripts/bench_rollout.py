"""GRPO rollouts on SmolLM2-135M-Instruct: generated tokens per second, alignctl's engines against the
`model.generate` path TRL's GRPOTrainer samples with (issue 26: target 3x per generated token).

Every side samples K completions of up to `--new-tokens` tokens for the same prompts, from the same
LoRA model (r = 8 on every linear layer, B != 0 so the adapter matters), temperature 1, no top-k/top-p:
- `generate-fp32`, `generate-bf16`: `model.generate(prompts repeated K times, do_sample=True)` on the
  float32 model, as TRL's GRPOTrainer calls it with bf16=False / bf16=True (bf16 autocast on CPU);
- `alignctl-native`, `alignctl-hf`: `alignctl.rl.rollout.sample` with the native decoder or the `hf`
  engine (generate from a prompt cache shared by the K samples), on the model as alignctl's
  hardware=cpu defaults hold it (frozen base in bf16, adapters float32, bf16 autocast).
Tokens per second count the completion tokens each side returns (up to and including EOS). The sides
alternate within each repetition (reversed every other one); figures are medians.

    PYTHONPATH=. python scripts/bench_rollout.py [--generations 4] [--prompts 1] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def lora_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


def alignctl_held(model):
    """The same weights as alignctl holds them under hardware=cpu with an adapter: base bf16, adapters float32."""
    held = copy.deepcopy(model)
    for name, parameter in held.named_parameters():
        parameter.data = parameter.data.float() if "lora_" in name else parameter.data.to(torch.bfloat16)
    return held


def prompts_of(tokenizer, count: int, data: Path) -> list[list[int]]:
    rows = [json.loads(line) for line in data.read_text().splitlines()][:count]
    return [tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=True, return_dict=False)
            for row in rows]


def generate_side(model, prompt_ids, generations, new_tokens, pad_id, eos_id, bf16: bool) -> int:
    from alignctl.data.batching import pad

    ids = pad(prompt_ids, pad_id, side="left").repeat_interleave(generations, 0)
    mask = pad([[1] * len(p) for p in prompt_ids], 0, side="left").repeat_interleave(generations, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
    new = out[:, ids.size(1):]
    ended = (new == eos_id).int().cumsum(-1)
    return int(((ended == 0) | ((ended == 1) & (new == eos_id))).sum())  # tokens up to and including the first EOS


def alignctl_side(model, prompt_ids, generations, new_tokens, pad_id, eos_id, engine: str) -> int:
    from alignctl.rl.rollout import Sampling, sample

    with torch.autocast("cpu", dtype=torch.bfloat16):
        done = sample(model, prompt_ids, generations, Sampling(1.0, 1.0, 0, new_tokens, engine=engine), pad_id, eos_id)
    assert done.engine == engine, done.engine
    return sum(map(len, done.completion_ids))


def main() -> None:
    import bench
    import bench_real
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = bench_real.smollm2_dir_or_exit("bench_rollout")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = bench.write_data(Path("bench/rollout"), "grpo", args.prompts, prompt_chars=(40, 200), answer_chars=(30, 200))
    prompt_ids = prompts_of(tokenizer, args.prompts, data)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    plain = lora_model(model_dir)
    held = alignctl_held(plain)
    sides = {
        "generate-fp32": lambda: generate_side(plain, prompt_ids, args.generations, args.new_tokens, pad_id, eos_id, bf16=False),
        "generate-bf16": lambda: generate_side(plain, prompt_ids, args.generations, args.new_tokens, pad_id, eos_id, bf16=True),
        "alignctl-native": lambda: alignctl_side(held, prompt_ids, args.generations, args.new_tokens, pad_id, eos_id, "native"),
        "alignctl-hf": lambda: alignctl_side(held, prompt_ids, args.generations, args.new_tokens, pad_id, eos_id, "hf"),
    }
    for run in sides.values():  # warm-up: kernels, the engine check, allocator
        run()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for rep in range(args.repeats):
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for name in order:
            torch.manual_seed(rep)
            start = time.perf_counter()
            tokens = sides[name]()
            rates[name].append(tokens / (time.perf_counter() - start))
    best_generate = max(statistics.median(rates["generate-fp32"]), statistics.median(rates["generate-bf16"]))
    print(f"SmolLM2-135M-Instruct + LoRA, {args.prompts} prompt(s) x {args.generations} completions, up to {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print("| side | generated tokens/s (runs) | × generate's faster |")
    print("|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} ({', '.join(f'{v:.1f}' for v in values)}) | {median / best_generate:.2f}× |")


if __name__ == "__main__":
    main()
