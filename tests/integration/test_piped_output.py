"""Output that reads well when piped or redirected: nothing cut at 80 columns, plain progress lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys

# A model wide enough for eight-digit parameter counts, with LoRA so `trainable` is a figure of its own.
PLAN = ["plan", "recipe=sft", "adapter=lora", "model.tiny.hidden_size=768", "model.tiny.intermediate_size=3072", "model.tiny.num_heads=12"]


def test_piped_plan_holds_full_numbers_and_headers(alignctl):
    # The in-process runner's stdout is a file, as `alignctl plan ... > plan.txt` is.
    figures = json.loads(alignctl(*PLAN, "--json").stdout)["models"][0]
    text = alignctl(*PLAN)
    assert text.returncode == 0, text.describe()
    assert f"{figures['params']:,}" in text.stdout
    assert f"{figures['trainable']:,}" in text.stdout
    header = next(line for line in text.stdout.splitlines() if "params" in line)
    assert re.search(r"\btrainable\b", header), header
    assert "…" not in text.stdout


def test_piped_training_prints_plain_step_lines(alignctl):
    result = alignctl("train", "recipe=sft", "recipe.max_steps=4", "recipe.eval_every=0", "logger.log_every=2", "data.eval_limit=8")
    assert result.returncode == 0, result.describe()
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    trained = [line.split(":")[0] for line in steps if " loss=" in line]
    assert trained == ["step 2", "step 4"], result.stdout  # every log_every steps, and the last
    assert all(line.split(":", 1)[1].strip() for line in steps)  # every line carries figures
    assert not [line for line in result.stdout.splitlines() if "eta" in line]  # no progress bar drawn into the file


def test_a_reader_that_goes_away_ends_quietly(repo_root):
    # `alignctl --help | head -0`: the pipe closes before alignctl writes (it starts in about a second).
    process = subprocess.Popen([sys.executable, "-m", "alignctl", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=repo_root)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
