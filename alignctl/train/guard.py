"""The guard (recipe.guard): opt-in monitors for the failure modes of preference and RL training.

Three signals, read from the metrics the loop already has (no model, no I/O here):

- over-optimisation: the held-out metric (eval_exact_match, else eval_reward, else
  eval_rewards/accuracies) has fallen `guard_drop` or more below its best while the training reward
  (objective/scores, else reward, else rewards/margins; averaged over the last `guard_window` steps)
  stands above where it stood at that best: the policy is exploiting the reward, not learning the task
  (Gao et al. 2023). It waits for `guard_min_evals` evaluations, step 0's included.
- KL: objective/kl, averaged over `guard_window` steps, above `guard_kl_max`.
- length bias: completions/length_reward_corr (the rollout's correlation of completion length with
  reward), averaged over `guard_window` steps, above `guard_length_corr`.

Each signal trips once. `Guard.after_step` and `Guard.after_eval` return what tripped; the loop
(alignctl/train/loop.py) prints it, logs it and, with recipe.guard=stop, ends the run there. What it
has seen travels with every checkpoint (`state` / `load_state`), so a resumed run trips where the
uninterrupted one would.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from alignctl.config.schema import GuardMode, TrainConfig

HELD_OUT = ("eval_exact_match", "eval_reward", "eval_rewards/accuracies")
TRAINING_REWARD = ("objective/scores", "reward", "rewards/margins")
KL = "objective/kl"
LENGTH_CORRELATION = "completions/length_reward_corr"
FRACTIONS = ("eval_exact_match", "eval_rewards/accuracies")  # shown in points and percent


@dataclass(frozen=True)
class Trip:
    signal: str  # "held-out", "kl" or "length"
    message: str  # what tripped, its value and the threshold


@dataclass(frozen=True)
class Evaluation:
    step: int
    value: float
    reward: float | None  # the training reward (window mean) when it was taken; None before any step


@dataclass
class Guard:
    drop: float
    kl_max: float | None
    length_corr_max: float | None
    min_evals: int
    window: int
    recent: deque = field(default_factory=deque)  # the last `window` steps' metrics
    first_reward: float | None = None  # the first step's training reward: the baseline for a best at step 0
    evals: list[Evaluation] = field(default_factory=list)
    tripped: set[str] = field(default_factory=set)

    def after_step(self, step: int, metrics: dict[str, float]) -> list[Trip]:
        """Take one optimiser step's metrics; the KL and length signals that trip now."""
        self.recent.append(metrics)
        while len(self.recent) > self.window:
            self.recent.popleft()
        if self.first_reward is None:
            self.first_reward = self._reward()
        trips = []
        if self.kl_max is not None and (kl := self._full_window_mean(KL)) is not None and kl > self.kl_max:
            trips.append(Trip("kl", f"{KL} averaged {kl:.3g} over the last {self.window} steps, above recipe.guard_kl_max={self.kl_max:g}"))
        if self.length_corr_max is not None and (corr := self._full_window_mean(LENGTH_CORRELATION)) is not None and corr > self.length_corr_max:
            trips.append(Trip("length", f"completion length and reward correlate at {corr:.2f} over the last {self.window} steps, "
                                        f"above recipe.guard_length_corr={self.length_corr_max:g}"))
        return self._first_time(trips)

    def after_eval(self, step: int, metrics: dict[str, float]) -> list[Trip]:
        """Take one evaluation's metrics; the over-optimisation signal if it trips now."""
        key = next((k for k in HELD_OUT if k in metrics), None)
        if key is None:
            return []
        now = Evaluation(step, float(metrics[key]), self._reward())
        best = max(self.evals, key=lambda e: e.value, default=None)
        self.evals.append(now)
        if best is None or len(self.evals) < self.min_evals or best.value - now.value < self.drop:
            return []
        reward_then = best.reward if best.reward is not None else self.first_reward
        if now.reward is None or reward_then is None or now.reward <= reward_then:
            return []  # the training reward fell too: a collapse, not over-optimisation
        return self._first_time([Trip("held-out", _over_optimised(key, best, now, self._reward_key(), reward_then, self.drop))])

    def state(self) -> dict:
        """What the guard has seen, as plain data (a checkpoint's trainer_state.pt loads weights_only)."""
        return {"recent": [dict(m) for m in self.recent], "first_reward": self.first_reward,
                "evals": [[e.step, e.value, e.reward] for e in self.evals], "tripped": sorted(self.tripped)}

    def load_state(self, state: dict) -> None:
        self.recent = deque(state["recent"][-self.window:])
        self.first_reward = state["first_reward"]
        self.evals = [Evaluation(step, value, reward) for step, value, reward in state["evals"]]
        self.tripped = set(state["tripped"])

    def _reward_key(self) -> str | None:
        return next((k for k in TRAINING_REWARD if any(k in m for m in self.recent)), None)

    def _reward(self) -> float | None:
        key = self._reward_key()
        return None if key is None else _mean([m[key] for m in self.recent if key in m])

    def _full_window_mean(self, key: str) -> float | None:
        values = [m[key] for m in self.recent if key in m]
        return _mean(values) if len(values) == self.window else None

    def _first_time(self, trips: list[Trip]) -> list[Trip]:
        fresh = [t for t in trips if t.signal not in self.tripped]
        self.tripped.update(t.signal for t in fresh)
        return fresh


def guard_for(recipe: TrainConfig) -> Guard | None:
    """The recipe's guard, or None when recipe.guard is off."""
    if recipe.guard == GuardMode.off:
        return None
    return Guard(recipe.guard_drop, recipe.guard_kl_max, recipe.guard_length_corr, recipe.guard_min_evals, recipe.guard_window)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _over_optimised(key: str, best: Evaluation, now: Evaluation, reward_key: str | None, reward_then: float, drop: float) -> str:
    """'held-out eval_exact_match fell 9.0 points from its best 86.0 % (step 25; threshold 5) while objective/scores rose (0.12 -> 0.85)'."""
    if key in FRACTIONS:
        fall = f"fell {100 * (best.value - now.value):.1f} points from its best {100 * best.value:.1f} % (step {best.step}; threshold {100 * drop:g})"
    else:
        fall = f"fell {best.value - now.value:.3g} from its best {best.value:.4g} (step {best.step}; threshold {drop:g})"
    return f"held-out {key} {fall} while {reward_key} rose ({reward_then:.3g} -> {now.reward:.3g})"
