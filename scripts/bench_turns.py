"""Time a multi-turn rollout of alignctl's tiny model with each episode's KV cache kept between turns
(the native engine's default) against every later turn prefilling its episode again.

    PYTHONPATH=. python scripts/bench_turns.py [--turns 4] [--repeats 3]

Both ways sample the same tokens from the same seed (checked here); the script prints, for each, the
tokens prefilled over the rollout and the median wall time of `--repeats` alternating runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


class Echo:
    """Replies with a fixed tool result every turn until `turns` model turns were taken."""

    reply = "result: 1234 (ok), next step please"

    def __init__(self, turns: int):
        self.turns, self.taken = turns, 0

    def reset(self, row: dict) -> None:
        self.taken = 0

    def step(self, turn: str):
        from alignctl.rl.environments import StepResult

        self.taken += 1
        return StepResult(self.reply, self.taken >= self.turns, 0.0)


def tiny_policy(tokenizer) -> torch.nn.Module:
    """alignctl's tiny shape (scripts/bench.py: 6 layers, width 96, 512 positions), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                         intermediate_size=384, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def rollout(policy, tokenizer, rows, args, resume: bool):
    from alignctl.rl.environments import EnvironmentSpec
    from alignctl.rl.multi_turn import sample_episodes
    from alignctl.rl.rollout import Sampling

    spec = EnvironmentSpec("Echo", lambda: Echo(args.turns), args.turns, [])
    torch.manual_seed(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    episodes = sample_episodes(policy, tokenizer, rows, args.group, Sampling(1.0, 1.0, 0, args.max_new_tokens, "native"), spec,
                               max_length=512, resume=resume)
    return time.perf_counter() - start, time.process_time() - cpu_start, episodes


def main(argv: list[str] | None = None) -> None:
    from alignctl.data.encode import encode_prompt
    from alignctl.models.tokenizer import build_char_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    tokenizer = build_char_tokenizer()
    policy = tiny_policy(tokenizer)
    prompts = [f"Question {i}: what is {17 * i + 3} + {29 * i + 11}? Use the calculator tool, then answer." for i in range(args.prompts)]
    rows = {"prompt": prompts, "prompt_ids": [encode_prompt(tokenizer, p) for p in prompts]}
    rollout(policy, tokenizer, rows, args, True)  # warm-up: the engine's first-use check against the model's forward
    # Wall time, and the process's CPU time, which other load on a shared machine disturbs less.
    seconds: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    results = {}
    for _ in range(args.repeats):
        for resume in (True, False):
            elapsed, used, results[resume] = rollout(policy, tokenizer, rows, args, resume)
            seconds[resume].append(elapsed)
            cpu[resume].append(used)
    kept, again = results[True].completions, results[False].completions
    assert kept.completion_ids == again.completion_ids, "the two ways sampled different tokens"
    tokens = sum(len(ids) for ids in kept.completion_ids) + sum(len(ids) for ids in kept.prompt_ids)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.prompts} prompts x {args.group} episodes, {args.turns} turns "
          f"of up to {args.max_new_tokens} tokens; {tokens} episode tokens in all; median of {args.repeats}")
    for resume, name in ((True, "caches kept"), (False, "prefilled again")):
        runs = seconds[resume]
        print(f"{name:16} prefill tokens {results[resume].prefill_tokens:6d}   wall {statistics.median(runs):.3f} s (runs {min(runs):.3f} to "
              f"{max(runs):.3f} s), CPU {statistics.median(cpu[resume]):.3f} s")
    print(f"speed-up x{statistics.median(seconds[False]) / statistics.median(seconds[True]):.2f} wall, "
          f"x{statistics.median(cpu[False]) / statistics.median(cpu[True]):.2f} CPU; "
          f"prefill x{results[False].prefill_tokens / results[True].prefill_tokens:.2f} fewer tokens")


if __name__ == "__main__":
    main()
