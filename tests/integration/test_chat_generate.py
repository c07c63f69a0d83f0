"""`alignctl chat` through a pseudo-terminal and `alignctl generate` on a short SFT run."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, run_cli

QUESTION = "347+089="


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    run = root / "sft"
    result = run_cli(["train", "recipe=sft", "recipe.max_steps=30", "recipe.eval_every=0", "data.eval_limit=8", f"hydra.run.dir={run}"], cwd=root)
    assert result.returncode == 0, result.describe()
    return run


def greedy_chat_answer(alignctl, run: Path, tmp_path: Path) -> str:
    """What generate answers, greedily, to QUESTION as a one-message conversation (the chat template)."""
    data, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": QUESTION}]}) + "\n")
    result = alignctl("generate", f"run={run}", f"data={data}", f"out={out}", "temperature=0", "max_new_tokens=6")
    assert result.returncode == 0, result.describe()
    return json.loads(out.read_text())["completion"]


class Terminal:
    """A child process on a pseudo-terminal: what a user at a keyboard sees and types."""

    def __init__(self, args: list[str]):
        self.master, slave = os.openpty()
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, close_fds=True)
        os.close(slave)
        self.seen = ""  # printed and not yet read by read_until
        self.transcript = ""  # everything printed

    def read_until(self, marker: str, limit: float = 300) -> str:
        """Everything printed up to `marker` (the hang guard `limit` is not a timing assertion)."""
        end = time.monotonic() + limit
        while marker not in self.seen:
            assert time.monotonic() < end, f"no {marker!r} in:\n{self.seen}"
            ready, _, _ = select.select([self.master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(self.master, 4096).decode("utf-8", errors="replace")
                except OSError:  # the child closed the terminal
                    break
                self.seen += chunk
                self.transcript += chunk
        before, _, self.seen = self.seen.partition(marker)
        return before

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())


def test_chat_answers_through_a_pty_and_reset_clears_history(sft_run, alignctl, tmp_path):
    expected = greedy_chat_answer(alignctl, sft_run, tmp_path)
    terminal = Terminal([sys.executable, "-m", "alignctl", "chat", f"run={sft_run}", "max_new_tokens=6", "temperature=0"])
    try:
        terminal.read_until("> ")
        terminal.type(QUESTION + "\n")
        first = terminal.read_until("> ").replace("\r", "").split(QUESTION + "\n", 1)[-1].strip()
        assert first and first == expected.strip()  # the answer generate gives to the same conversation
        terminal.type("/reset\n")
        assert "history cleared" in terminal.read_until("> ")
        terminal.type(QUESTION + "\n")
        # After /reset the model sees the one question again, as on the first turn.
        assert terminal.read_until("> ").replace("\r", "").split(QUESTION + "\n", 1)[-1].strip() == first
        assert "warn" not in terminal.transcript.lower() and "Traceback" not in terminal.transcript
        terminal.type("\x04")  # Ctrl-D: end of input
        assert terminal.process.wait(timeout=120) == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
        os.close(terminal.master)


def test_chat_reads_piped_stdin(sft_run, run_cmd):
    done = subprocess.run([sys.executable, "-m", "alignctl", "chat", f"run={sft_run}", "max_new_tokens=4"], input=f"{QUESTION}\n/exit\n",
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "chatting with" in done.stdout and not done.stderr.strip(), done.stderr


def test_generate_writes_one_line_per_row_and_per_sample(sft_run, alignctl, tmp_path):
    data = tmp_path / "prompts.jsonl"
    prompts = ["347+089=", "100+200=", "999+001="]
    data.write_text("".join(json.dumps({"prompt": p, "other": 1}) + "\n" for p in prompts))
    result = alignctl("generate", f"run={sft_run}", f"data={data}", f"out={tmp_path / 'one.jsonl'}", "max_new_tokens=5", "batch_size=2")
    assert result.returncode == 0, result.describe()
    assert not result.stderr_lines(), result.describe()  # no library warnings on alignctl's console
    rows = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(isinstance(r["completion"], str) for r in rows)

    result = alignctl("generate", f"run={sft_run}", f"data={data}", f"out={tmp_path / 'three.jsonl'}", "n=3", "max_new_tokens=5")
    assert result.returncode == 0, result.describe()
    rows = [json.loads(line) for line in (tmp_path / "three.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [(p, k) for p in prompts for k in range(3)]


@pytest.mark.parametrize("case", ["missing run", "no prompt column", "unknown key", "reward run"])
def test_bad_input_is_one_line_exit_2(case, sft_run, alignctl, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    args = {"missing run": ["generate", f"run={tmp_path / 'nowhere'}", f"data={data}", f"out={tmp_path / 'o.jsonl'}"],
            "no prompt column": ["generate", f"run={sft_run}", f"data={tmp_path / 'bad.jsonl'}", f"out={tmp_path / 'o.jsonl'}"],
            "unknown key": ["chat", f"run={sft_run}", "temprature=0.5"],
            "reward run": ["chat", f"run={tmp_path / 'reward'}"]}[case]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "1+1="}) + "\n")
    (tmp_path / "reward" / "checkpoint").mkdir(parents=True)
    (tmp_path / "reward" / "lineage.json").write_text(json.dumps({"stage": "reward"}))
    result = alignctl(*args)
    assert result.returncode == 2, result.describe()
    assert len(result.stderr_lines()) == 1 and "Traceback" not in result.stderr, result.describe()
    assert not (tmp_path / "o.jsonl").exists()


def test_ctrl_c_at_the_prompt_quits_the_chat(sft_run):
    process = subprocess.Popen([sys.executable, "-m", "alignctl", "chat", f"run={sft_run}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert "chatting with" in process.stdout.readline()  # the model is loaded; it waits for a line
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and not stderr.strip(), stderr
