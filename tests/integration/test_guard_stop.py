"""recipe.guard through the real CLI.

Fast: a tiny GRPO run with a contrived KL ceiling (any KL at all trips it). With guard=stop the run
ends at the step that tripped: exit 0, one `guard:` line, a finished run whose checkpoint loads and
whose lineage and `alignctl runs` say why it stopped; with guard=warn it says so once and trains on.

Slow: the over-optimisation case of docs/results.md, on the built-in task: SFT, a plain reward model
(a scalar head on the SFT model, no extra layers or LM loss, 400 steps), then PPO
against it with a small beta, guarded and unguarded.
"""

from __future__ import annotations

import json
import time

import pytest
from stage_runs import StageRun

# beta > 0: a reference and objective/kl (k3, zero at step 1 where the policy is the reference). An
# untrained model never answers right: reward length instead, which varies.
KL_RUN = ["train", "recipe=grpo", "recipe.beta=0.1", "recipe.batch_size=16", "recipe.num_generations=4", "recipe.max_steps=5",
          "recipe.lr=1e-2", "recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 2}]", "recipe.eval_every=0",
          "data.eval_limit=16", "recipe.guard_kl_max=1e-6", "recipe.guard_window=1"]


def _guard_lines(run: StageRun) -> list[str]:
    return [line for line in run.result.output.splitlines() if line.startswith("guard:")]


def test_guard_stop_ends_the_run_early_as_a_finished_one(alignctl, tmp_path):
    run_dir = tmp_path / "stop"
    run = StageRun("stop", run_dir, alignctl(*KL_RUN, "recipe.guard=stop", f"hydra.run.dir={run_dir}"))
    run.assert_finished()
    lines = _guard_lines(run)
    assert len(lines) == 1 and "objective/kl averaged" in lines[0] and "above recipe.guard_kl_max=1e-06" in lines[0], run.result.output
    stopped_at = int(lines[0].rsplit(" ", 1)[1])
    assert 2 <= stopped_at < 5  # step 1's KL is zero: the first update moves it
    assert max(r["step"] for r in run.train_records()) == stopped_at
    assert [r["guard"] for r in run.records() if "guard" in r] == ["kl"]
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["guard_stop"] == {"step": stopped_at, "reason": lines[0]}
    assert json.loads((run_dir / "eval.json").read_text())["step"] == stopped_at
    from transformers import AutoModelForCausalLM

    assert (run_dir / "checkpoint").resolve().name == f"step-{stopped_at:06d}"
    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")
    listed = json.loads(alignctl("runs", str(run_dir), "--json").stdout)
    assert listed[0]["status"] == "finished" and listed[0]["guard_stop"]["step"] == stopped_at
    reported = alignctl("report", str(run_dir))
    assert f"guard stop at step {stopped_at}" in " ".join(reported.output.split()), reported.describe()


def test_guard_warn_says_it_once_and_trains_on(alignctl, tmp_path):
    run_dir = tmp_path / "warn"
    run = StageRun("warn", run_dir, alignctl(*KL_RUN, "recipe.guard=warn", f"hydra.run.dir={run_dir}"))
    run.assert_finished()
    lines = _guard_lines(run)
    assert len(lines) == 1 and lines[0].endswith("training on (recipe.guard=warn)"), run.result.output
    assert max(r["step"] for r in run.train_records()) == 5
    assert "guard_stop" not in json.loads((run_dir / "lineage.json").read_text())


# ------------------------------------------------------------------------------------- slow
PPO_CASE = ["recipe=ppo", "recipe.beta=0.05", "recipe.eval_every=5", "recipe.max_steps=100", "data.eval_limit=500"]


@pytest.mark.slow
def test_the_guard_stops_over_optimising_ppo_near_its_best(alignctl, learned_sft_run, tmp_path):
    """SFT -> plain reward model -> PPO (beta 0.05): the guarded run stops within a few points of the best
    held-out score it reached; the unguarded one, the same run to step 100, ends well below that best."""
    sft_dir, sft_result = learned_sft_run
    assert sft_result.returncode == 0, sft_result.describe()
    started = time.perf_counter()
    reward_dir = tmp_path / "reward"
    reward = StageRun("reward", reward_dir, alignctl("train", "recipe=reward", f"inputs.init={sft_dir}", "recipe.extra_layers=0",
                                                     "recipe.lm_loss_coef=0", "recipe.max_steps=400", "recipe.eval_every=0",
                                                     "data.eval_limit=500", f"hydra.run.dir={reward_dir}"))
    reward.assert_finished()
    reward_seconds = time.perf_counter() - started

    def ppo(name: str, *overrides: str) -> tuple[StageRun, list[dict], float]:
        began = time.perf_counter()
        run = StageRun(name, tmp_path / name, alignctl("train", *PPO_CASE, f"inputs.policy={sft_dir}", f"inputs.reward={reward_dir}",
                                                      *overrides, f"hydra.run.dir={tmp_path / name}"))
        run.assert_finished()
        return run, [r for r in run.records() if "eval_exact_match" in r], time.perf_counter() - began

    guarded, guarded_evals, guarded_seconds = ppo("guarded", "recipe.guard=stop")
    unguarded, unguarded_evals, unguarded_seconds = ppo("unguarded")
    best = max(r["eval_exact_match"] for r in guarded_evals)
    stop = json.loads((guarded.dir / "lineage.json").read_text())["guard_stop"]
    at_stop = next(r["eval_exact_match"] for r in guarded_evals if r["step"] == stop["step"])
    print(f"\nreward model: {reward_seconds:.0f} s, pair accuracy {json.loads((reward_dir / 'eval.json').read_text()).get('eval_accuracy')}; "
          f"guarded PPO: best {best:.3f}, stopped at step {stop['step']} with {at_stop:.3f} ({guarded_seconds:.0f} s); "
          f"unguarded: best {max(r['eval_exact_match'] for r in unguarded_evals):.3f}, "
          f"end {unguarded_evals[-1]['eval_exact_match']:.3f} ({unguarded_seconds:.0f} s)\n{stop['reason']}")
    assert stop["step"] < 100 and "held-out eval_exact_match" in stop["reason"]
    assert best - at_stop <= 0.08  # within a few points: the drop threshold (5) plus one evaluation's further fall
    assert guarded_evals == unguarded_evals[: len(guarded_evals)]  # the guard watches; it changes nothing before it stops
    end = unguarded_evals[-1]
    assert end["step"] == 100 and end["eval_exact_match"] <= best - 0.08 and end["eval_exact_match"] < at_stop  # the guard mattered
