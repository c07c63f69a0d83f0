"""One side (alignctl or TRL) of one benchmark case, in a process of its own; prints one result line.

Both sides are measured the same way: the clock starts just before the first optimiser step (its data
fetch included) and stops when the last step ends; training memory is the peak resident set size
between those two moments minus the resident set size at the first, the peak being reset through
/proc/self/clear_refs (Linux) so that model loading and tokenisation are not counted. Each step's
seconds are the time from the end of the step before (for the first, the start of the clock) to the
end of this one, its data fetch (a GRPO step's rollout) included. Both sides end by writing the trained
model, as their command-line tools do (alignctl's checkpoint also holds its optimiser state). Launched by
scripts/bench.py; see it (and scripts/bench_real.py, the real-model tier) for the cases.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

MARKER = "BENCH_RESULT "
HERE = Path(__file__).resolve().parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class Probe:
    """Training seconds and training memory, taken identically for both sides."""

    def __init__(self) -> None:
        self.started = self.ended = 0.0
        self.baseline_kib = self.peak_kib = 0
        self.losses: list[float] = []
        self.step_ends: list[float] = []

    def step_end(self) -> None:
        self.step_ends.append(time.perf_counter())

    def start(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.baseline_kib = _status_kib("VmRSS")
        self.started = time.perf_counter()

    def stop(self) -> None:
        self.ended = time.perf_counter()
        self.peak_kib = _status_kib("VmHWM")

    def result(self) -> dict:
        return {
            "seconds": self.ended - self.started,
            "memory_mib": (self.peak_kib - self.baseline_kib) / 1024,
            "losses": self.losses,
            "step_seconds": [b - a for a, b in zip([self.started, *self.step_ends], self.step_ends)],
            "allocator": host_allocator(),
        }


def host_allocator() -> str:
    """The malloc this process runs under, from its memory map (the same test as alignctl.core.allocator.active)."""
    maps = Path("/proc/self/maps").read_text()
    return next((name for name in ("jemalloc", "tcmalloc") if f"lib{name}" in maps), "system")


def vowel_share(prompts, completions, **_) -> list[float]:
    """The benchmark's GRPO reward (both sides call this same function): share of vowels in a completion."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


# ---------------------------------------------------------------------------------------------- alignctl


def run_alignctl(spec: dict) -> dict:
    sys.path.insert(0, str(HERE))  # so that alignctl imports the reward function as bench_worker.vowel_share
    import alignctl.train.loop as loop
    from alignctl.cli.main import main

    probe = Probe()
    original = loop._one_step

    def measured(ctx, recipe, next_step, step_fn, step):
        if step == 1:
            probe.start()
        record = original(ctx, recipe, next_step, step_fn, step)
        probe.step_end()
        probe.losses.append(float(record["loss"]))
        if step == recipe.max_steps:
            probe.stop()
        return record

    loop._one_step = measured
    sys.argv = ["alignctl", "train", *alignctl_overrides(spec)]
    main()
    return probe.result()


def alignctl_overrides(spec: dict) -> list[str]:
    stage = spec["stage"]
    args = [
        f"recipe={stage}", "model=hf", f"model.name_or_path={spec['model_dir']}", "model.attn_implementation=sdpa",
        "data=hf", f"data.path={spec['data']}",
        f"adapter={'lora' if spec['lora'] else 'none'}",
        f"recipe.max_steps={spec['steps']}", f"recipe.batch_size={spec['batch_size']}", "recipe.grad_accum=1",
        f"recipe.max_length={spec['max_length']}", f"recipe.lr={spec['lr']}", "recipe.scheduler=constant",
        "recipe.warmup_ratio=0.0", "recipe.weight_decay=0.0", "recipe.max_grad_norm=1.0",
        "recipe.eval_every=0", "recipe.save_every=0",
        f"hardware.num_threads={spec['threads']}", f"seed={spec['seed']}", f"hydra.run.dir={spec['run_dir']}",
        *spec.get("alignctl", []),
    ]
    if stage == "reward":  # TRL's RewardTrainer is the plain Bradley-Terry model
        args += ["recipe.extra_layers=0", "recipe.lm_loss_coef=0.0", "recipe.center_rewards_coefficient=0.0"]
    if stage in ("dpo", "kto"):
        args += [f"recipe.beta={spec['beta']}"]
    if stage == "grpo":
        args += [
            f"recipe.num_generations={spec['num_generations']}", f"recipe.max_new_tokens={spec['max_new_tokens']}",
            "recipe.reward_funcs=[bench_worker.vowel_share]", "recipe.beta=0.0", "recipe.temperature=1.0",
            "recipe.loss_aggregation=token", "recipe.advantage=grpo",
        ]
    return args


# --------------------------------------------------------------------------------------------------- TRL


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    if spec["stage"] == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    probe = Probe()

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0 and not probe.started:
                probe.start()

        def on_step_end(self, args, state, control, **kwargs):
            probe.step_end()
            if state.global_step == spec["steps"]:
                probe.stop()

    trainer = TRL_BUILDERS[spec["stage"]](spec, model, tokenizer, dataset)
    trainer.add_callback(Measure())
    trainer.train()
    # The trained model on disk, as TRL's own command-line scripts end (trl/scripts/sft.py, dpo.py,
    # grpo.py: trainer.save_model(output_dir)) and as every alignctl run ends (alignctl also writes
    # its optimiser state for exact resume). Counted in the whole-process time, not in the steps.
    trainer.save_model(spec["run_dir"])
    probe.losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return probe.result()


def _common(spec: dict) -> dict:
    """TrainingArguments both sides share; TRL's own defaults (bf16, gradient checkpointing) turned off,
    bf16 on where the spec asks for it (the real tier's second TRL run: on CPU, bf16 autocast over
    float32 weights)."""
    return dict(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        bf16=bool(spec.get("bf16", False)), fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", seed=spec["seed"], dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
    )


def _lora(spec: dict):
    if not spec["lora"]:
        return None
    from peft import LoraConfig

    # A reward model's score head trains in full, as alignctl's does (TRL's docstring asks for this).
    head = {"task_type": "SEQ_CLS", "modules_to_save": ["score"]} if spec["stage"] == "reward" else {}
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", bias="none", **head)


def _sft(spec, model, tokenizer, dataset):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**_common(spec), max_length=spec["max_length"], completion_only_loss=True, packing=False)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=_lora(spec))


def _reward(spec, model, tokenizer, dataset):
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**_common(spec), max_length=spec["max_length"])
    return RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=_lora(spec))


def _dpo(spec, model, tokenizer, dataset):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common(spec), max_length=spec["max_length"], beta=spec["beta"], loss_type="sigmoid", precompute_ref_log_probs=False)
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=_lora(spec))


def _kto(spec, model, tokenizer, dataset):
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(**_common(spec), max_length=spec["max_length"], beta=spec["beta"])
    return KTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=_lora(spec))


def _grpo(spec, model, tokenizer, dataset):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        **_common(spec), num_generations=spec["num_generations"], max_completion_length=spec["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo",
        scale_rewards="group", log_completions=False,
    )
    return GRPOTrainer(model=model, reward_funcs=vowel_share, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=_lora(spec))


TRL_BUILDERS = {"sft": _sft, "reward": _reward, "dpo": _dpo, "kto": _kto, "grpo": _grpo}


def under_alignctl_allocator() -> None:
    """Re-execute this worker once under the allocator alignctl's CLI would pick (jemalloc where installed),
    as the CLI does itself: otherwise the CLI would re-execute as itself, and this worker's measurements
    and result line would be lost. Callers that already preload it (scripts/bench.py) are left as they are."""
    from alignctl.core import allocator

    env = allocator.environment(os.environ)
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec["side"] == "alignctl":
        under_alignctl_allocator()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec.get("fresh_datasets_cache"):
        # An empty datasets cache for this process (set before `datasets` is imported): a run must not
        # reuse the Arrow files and map() results of the run before it, or the first side of a case
        # would pay for the data preparation of all of them (the whole-process times would show it).
        os.environ["HF_DATASETS_CACHE"] = str(Path(spec["run_dir"]) / "datasets-cache")
    result = run_alignctl(spec) if spec["side"] == "alignctl" else run_trl(spec)
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
