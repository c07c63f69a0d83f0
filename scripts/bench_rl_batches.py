"""GRPO's training forward and backward on SmolLM2-135M-Instruct, padded rows against padding-free ones.

One micro-batch as the real tier's GRPO case has it: one prompt, K = 4 completions of 28-32 tokens, LoRA
(conf/adapter/lora.yaml) on every linear layer. The per-token log-probs and entropies of the completions
(`response_token_logps`, chunked output layer), then backward through them; padded rows carry the prompt
K times, the padding-free batch once (alignctl/nn/prompt_groups.py). Under bf16 autocast where this CPU
has native bf16 (as `hardware=cpu` runs), float32 elsewhere. Prints the median of `--reps` timed passes
(after two warm-ups) for each layout, the layouts alternating.

    PYTHONPATH=. python scripts/bench_rl_batches.py [--prompt-tokens 30 100] [--reps 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[30, 100])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import bench_real
    from transformers import AutoModelForCausalLM

    from alignctl.config.schema import LoraConfig
    from alignctl.models.adapters import apply_adapter
    from alignctl.models.precision import cpu_has_native_bf16
    from alignctl.nn import cpu_attention
    from alignctl.nn.logprobs import left_padded_batch, response_token_logps
    from alignctl.nn.prompt_groups import prompt_group_fields

    torch.set_num_threads(args.threads)
    model_dir = bench_real.smollm2_dir_or_exit("bench_rl_batches")
    model = cpu_attention.use_on_cpu(AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32))
    lora = LoraConfig(**OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "adapter" / "lora.yaml")))
    model = apply_adapter(model, lora).train()
    bf16 = cpu_has_native_bf16()
    print(f"SmolLM2-135M-Instruct, LoRA r={lora.r}, {'bf16 autocast' if bf16 else 'float32 (no native bf16 on this CPU)'}, {args.threads} threads")
    generator = torch.Generator().manual_seed(0)
    for length in args.prompt_tokens:
        prompts = [torch.randint(100, 40000, (length,), generator=generator).tolist()] * 4
        responses = [torch.randint(100, 40000, (n,), generator=generator).tolist() for n in (32, 32, 32, 28)]
        batch = left_padded_batch(prompts, responses, 2) | prompt_group_fields(prompts, responses)
        times: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(args.reps + 2):
            for padding_free in (False, True) if rep % 2 == 0 else (True, False):
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logps, _, entropy = response_token_logps(model, batch, with_entropy=True, chunk=256, padding_free=padding_free)
                (logps.sum() + 0.0 * entropy.sum()).backward()
                if rep >= 2:
                    times[padding_free].append(time.perf_counter() - started)
        padded, packed = statistics.median(times[False]), statistics.median(times[True])
        tokens = 4 * length + sum(len(r) for r in responses)
        print(f"prompt {length} tokens: padded {padded * 1000:.0f} ms ({tokens} tokens), padding-free {packed * 1000:.0f} ms "
              f"({length + sum(len(r) for r in responses)} tokens): {padded / packed:.2f}x")


if __name__ == "__main__":
    main()
