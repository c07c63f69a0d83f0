"""alignctl.rl.online_rl: reward functions get completions (with completion_ids and trainer_state) in
TRL's form, and the run's log of rollouts (the engine that sampled them, a readable table of samples,
every logged sample in samples.jsonl)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from rich.console import Console

from alignctl.rewards import format_check, length_penalty, task_verifier
from alignctl.rl.online_rl import ScoredRollout, sample_and_score
from alignctl.rl.reward_sources import RewardState, function_sources
from alignctl.rl.rollout import Completions, Sampling
from alignctl.rl.rollout_log import RolloutLog, readable_prompt, samples_table

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "12+30="}]

# A reward function written to TRL's documented form for conversational prompts (trl.rewards'
# think_format_reward and accuracy_reward read completion[0]["content"]).
TRL_STYLE = '''
import re

def trl_style(completions, **kwargs):
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.fullmatch(r"[0-9]+", c.strip()) else 0.0 for c in contents]

def record_forms(prompts, completions, completion_ids, trainer_state, **kwargs):
    record_forms.seen = list(completions)
    record_forms.extras = (completion_ids, trainer_state.global_step, trainer_state.max_steps)
    return [0.0] * len(completions)
'''


@pytest.fixture
def user_module(module_from_source):
    return module_from_source("trl_style_rewards", TRL_STYLE)


# ------------------------------------------------------------------------------ completion forms
def test_builtins_take_either_form():
    as_messages = [[{"role": "assistant", "content": c}] for c in ("0042", "0042 and more", "")]
    as_text = [m[0]["content"] for m in as_messages]
    for fn, extra in ((task_verifier, {"answer": ["0042"] * 3}), (format_check, {}), (length_penalty, {"max_chars": 4})):
        assert fn(prompts=[CHAT] * 3, completions=as_messages, **extra) == fn(prompts=["p"] * 3, completions=as_text, **extra)
    assert task_verifier(prompts=[CHAT] * 3, completions=as_messages, answer=["0042"] * 3) == [1.0, 0.0, 0.0]


class ScriptedPolicy(torch.nn.Module):
    """Not a model: `sample` is patched to return fixed completions, so only scoring runs."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("chat", [True, False])
def test_reward_functions_get_trl_completions(tok, user_module, monkeypatch, chat):
    answers = ["42", "forty-two"]
    completion_ids = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
    monkeypatch.setattr("alignctl.rl.online_rl.sample", lambda *a, **k: Completions([[5], [5]], completion_ids, [False, False], "native"))
    prompt = CHAT if chat else "12+30="
    sources = function_sources([f"{user_module}.record_forms"] + ([f"{user_module}.trl_style"] if chat else []), None)
    rollout = sample_and_score(ScriptedPolicy(), tok, {"prompt": [prompt], "prompt_ids": [[5]]}, 2, Sampling(1.0, 1.0, 0, 4), sources,
                               RewardState(global_step=6, max_steps=10))
    seen = sys.modules[user_module].record_forms.seen
    # TRL's other keyword arguments: the sampled ids (through EOS) and where training is.
    assert sys.modules[user_module].record_forms.extras == (completion_ids, 6, 10)
    if chat:  # TRL: a list of one assistant message per completion
        assert seen == [[{"role": "assistant", "content": a}] for a in answers]
        assert rollout.per_source["trl_style"].tolist() == [1.0, 0.0]
    else:  # TRL: the decoded text
        assert seen == answers
    assert rollout.texts == answers


# ----------------------------------------------------------------------------------- the log
def test_a_chat_prompt_reads_as_its_last_user_message():
    assert readable_prompt(CHAT + [{"role": "assistant", "content": "42"}, {"role": "user", "content": "and 1+1?"}]) == "and 1+1?"
    assert readable_prompt("12+30=") == "12+30="


def test_the_table_shows_whole_texts_without_markup():
    long = "the answer is [bold]42[/bold], " + "and more " * 20 + "END"
    table = samples_table(7, [CHAT], [long], torch.tensor([0.5]))
    console = Console(width=400, record=True)
    console.print(table)
    shown = console.export_text()
    assert "samples at step 7" in shown and "12+30=" in shown and "'role'" not in shown
    assert "[bold]42[/bold]" in shown and "END" in shown  # the completion whole, its brackets as written


class NoteLogger:
    def __init__(self, enabled: bool = True):
        self.enabled, self.notes = enabled, []

    def note(self, message) -> None:
        self.notes.append(message)


def rollout(engine: str = "native") -> ScoredRollout:
    completions = Completions([[1], [1]], [[3, 2], [4]], [False, True], engine)
    rewards = torch.tensor([1.0, -0.5])
    return ScoredRollout({}, [CHAT, CHAT], ["42", "forty"], completions, rewards,
                         {"task_verifier": torch.tensor([1.0, 0.0]), "length_penalty": torch.tensor([0.0, -0.5])}, {})


def test_the_engine_is_named_once_and_again_only_when_it_changes(tmp_path):
    logger = NoteLogger()
    log = RolloutLog(logger, tmp_path, every=0, steps_per_rollout=2)
    for engine in ("native", "native", "hf", "hf"):
        log.after(1, rollout(engine), torch.zeros(2))
    assert logger.notes == ["rollouts are sampled by the native decoder (alignctl/rl/decode.py)", "rollouts are sampled by transformers generate"]
    assert not (tmp_path / "samples.jsonl").exists()  # every=0: no samples logged


def test_every_logged_sample_is_appended_to_samples_jsonl(tmp_path):
    logger = NoteLogger()
    log = RolloutLog(logger, tmp_path, every=2, steps_per_rollout=3)
    for number in range(1, 5):  # rollouts 1 and 3 are logged; they feed steps 1-3 and 7-9
        log.after(number, rollout(), torch.tensor([1.0, -0.5]))
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1, 7, 7]
    assert records[1] == {"step": 1, "prompt": CHAT, "completion": "forty", "reward": -0.5,
                          "rewards": {"task_verifier": 0.0, "length_penalty": -0.5}, "truncated": True}
    assert sum(isinstance(n, type(samples_table(1, [], [], torch.zeros(0)))) for n in logger.notes) == 2


def test_a_resumed_run_replaces_the_samples_it_logs_again(tmp_path):
    first = RolloutLog(NoteLogger(), tmp_path, every=1, steps_per_rollout=1)
    for number in (1, 2, 3):
        first.after(number, rollout(), torch.zeros(2))
    resumed = RolloutLog(NoteLogger(), tmp_path, every=1, steps_per_rollout=1)  # resumed after step 1
    resumed.after(2, rollout(), torch.zeros(2))
    steps = [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2]


def test_only_the_main_process_writes_samples(tmp_path):
    RolloutLog(NoteLogger(enabled=False), tmp_path, every=1, steps_per_rollout=1).after(1, rollout(), torch.zeros(2))
    assert not (tmp_path / "samples.jsonl").exists()
