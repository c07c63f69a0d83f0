"""Multi-turn rollouts: the policy and an environment take turns, one completion per episode.

Each turn, every episode still running samples a turn with the rollout engine (alignctl/rl/rollout.py;
the first turn K per prompt, sharing the prompt's prefill), the environment reads its decoded text and
replies; the reply's tokens are appended and the episode goes on, until the environment says done,
``max_turns`` turns were sampled, or the episode reaches ``max_length`` tokens (then it is truncated).
Finished episodes leave the batch, their KV caches with them. With the native engine each running
episode's KV cache is kept between turns, so a later turn prefills only the last sampled token and the
environment's reply (`TurnSampler`); the hf and vllm engines prefill the whole episode again each turn.
`MultiTurnRollout.prefill_tokens` counts what was prefilled either way. The completion is every turn and reply end to end, with a token
mask (1: sampled by the policy, 0: the environment's) that keeps replies out of the loss, the KL and
the advantages, and the sampler's log-probs of the sampled tokens (0 at the environment's).

A reply is rendered as a ``tool`` message by the chat template after a conversational prompt (the
text the template writes between the model's turn and the next assistant header), else as plain
``<result>...</result>`` text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from alignctl.rl.decode import RowCache
from alignctl.rl.environments import EnvironmentSpec, Episode, call_format
from alignctl.rl.rollout import Completions, Sampling, sample, sample_resuming

SENTINEL = "\u2063sampled turn\u2063"  # a text no template changes, to find what it writes around a turn


@dataclass
class EpisodeState:
    env: Episode
    prompt: str | list[dict]
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1: sampled by the policy, 0: the environment's
    logps: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # the episode's assistant and tool messages
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    truncated: bool = False
    cache: RowCache | None = None  # the KV cache of prompt_ids + ids but the last sampled token, between turns (native engine)

    def add(self, ids: Sequence[int], sampled: bool, logps: Sequence[float] | None = None) -> None:
        self.ids += ids
        self.mask += [int(sampled)] * len(ids)
        self.logps += list(logps) if logps is not None else [0.0] * len(ids)


@dataclass
class MultiTurnRollout:
    completions: Completions  # with token_masks
    env_rewards: torch.Tensor  # (N,) each episode's summed step rewards
    final_turns: list[str]  # each episode's last model turn (what reward functions read)
    episodes: list[list[dict]]  # each episode's messages
    prefill_tokens: int = 0  # tokens the engine prefilled over the rollout (what keeping KV caches between turns saves)


def turn_closing(tokenizer, conversation: list[dict]) -> str:
    """What the chat template writes after an assistant turn's content (ChatML: ``<|im_end|>\\n``)."""
    text = tokenizer.apply_chat_template(conversation + [{"role": "assistant", "content": SENTINEL}], tokenize=False)
    return text[text.rindex(SENTINEL) + len(SENTINEL):]


def reply_text(tokenizer, conversation: list[dict], sampled_tail: str, reply: str) -> str:
    """The text between a model turn and the next assistant header, for a reply as a ``tool`` message.

    `conversation`: the prompt and the episode's messages, the model's last turn included;
    `sampled_tail`: what the model itself wrote after its turn's content (its end-of-turn token(s), or
    nothing when cut at max_new_tokens), so the closing the template writes is not written twice."""
    if not isinstance(conversation, list) or tokenizer.chat_template is None:
        return f"<result>{reply}</result>"
    closing = turn_closing(tokenizer, conversation[:-1])
    shared = 0
    while shared < min(len(closing), len(sampled_tail)) and closing[shared] == sampled_tail[shared]:
        shared += 1
    before = tokenizer.apply_chat_template(conversation, tokenize=False)
    try:
        after = tokenizer.apply_chat_template(conversation + [{"role": "tool", "content": reply}], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses a tool role (strict user/assistant alternation): the tag instead
        after = ""
    if not after.startswith(before):  # refused, or a template that rewrites earlier turns
        return closing[shared:] + f"<result>{reply}</result>"
    return closing[shared:] + after[len(before):]


def trailing_specials(tokenizer, ids: Sequence[int]) -> int:
    """How many special tokens (end of turn, EOS) end a sampled turn."""
    special, count = set(tokenizer.all_special_ids), 0
    while count < len(ids) and ids[len(ids) - 1 - count] in special:
        count += 1
    return count


def take_turn(state: EpisodeState, tokenizer, ids: list[int], logps: torch.Tensor | None, truncated: bool, max_turns: int, max_length: int) -> None:
    """Add a sampled turn, let the environment answer, and add its reply (or end the episode)."""
    state.add(ids, True, logps.tolist() if logps is not None else None)
    state.turns += 1
    text = tokenizer.decode(ids, skip_special_tokens=True)
    state.messages.append({"role": "assistant", "content": text})
    result = state.env.step(text)
    state.reward += result.reward
    if result.done or state.turns >= max_turns:
        state.done, state.truncated = True, truncated and not result.done
        return
    reply = result.reply or ""
    state.messages.append({"role": "tool", "content": reply})
    conversation = (state.prompt + state.messages[:-1]) if isinstance(state.prompt, list) else state.prompt
    tail = tokenizer.decode(ids[len(ids) - trailing_specials(tokenizer, ids):], skip_special_tokens=False)
    reply_ids = tokenizer(reply_text(tokenizer, conversation, tail, reply), add_special_tokens=False)["input_ids"]
    room = max_length - len(state.prompt_ids) - len(state.ids)
    if len(reply_ids) >= room:  # no room left for the model to answer: the episode is cut here
        state.add(reply_ids[: max(room, 0)], False)
        state.done, state.truncated = True, True
        return
    state.add(reply_ids, False)


def sample_episodes(policy: torch.nn.Module, tokenizer, rows: dict[str, list], group: int, sampling: Sampling, spec: EnvironmentSpec,
                    max_length: int, resume: bool = True) -> MultiTurnRollout:
    """`group` episodes per prompt of `rows` (consecutive, as single-turn completions are). `resume`:
    where the native engine samples, keep each episode's KV cache between turns and prefill only what
    came after it (the last sampled token and the reply); False (and the hf and vllm engines) prefill
    each later turn's whole episode again."""
    template_markup = call_format(tokenizer.chat_template)
    row_dicts = [dict(zip(rows, values)) for values in zip(*rows.values())]
    # A plain-text prompt is never rendered by the template (no tools declared, results as <result> tags):
    # its calls are read in the plain markup, whatever the template declares.
    states = [EpisodeState(spec.new(row, template_markup if isinstance(row["prompt"], list) else "plain"), row["prompt"], list(row["prompt_ids"]))
              for row in row_dicts for _ in range(group)]
    turns = TurnSampler(policy, tokenizer, resume)
    # The first turn samples K per prompt, sharing its prefill; later turns one per episode still running.
    first = turns.sample([list(ids) for ids in rows["prompt_ids"]], [None] * len(rows["prompt_ids"]), group, sampling)
    play(states, first, tokenizer, spec.max_turns, max_length)
    while active := [s for s in states if not s.done]:
        # Each episode's turn is bounded by its own room before max_length (not the fullest episode's): one
        # sampling call per bound, almost always just max_new_tokens.
        by_bound: dict[int, list[EpisodeState]] = {}
        for state in active:
            by_bound.setdefault(min(sampling.max_new_tokens, max_length - len(state.prompt_ids) - len(state.ids)), []).append(state)
        for bound, group_states in by_bound.items():
            turn = turns.sample([s.prompt_ids + s.ids for s in group_states], [s.cache for s in group_states], 1,
                                replace(sampling, max_new_tokens=bound))
            play(group_states, turn, tokenizer, spec.max_turns, max_length)
    completions = Completions([s.prompt_ids for s in states], [s.ids for s in states], [s.truncated for s in states], first.completions.engine,
                              sampler_logps=[torch.tensor(s.logps, dtype=torch.float32) for s in states] if first.completions.sampler_logps else None,
                              token_masks=[torch.tensor(s.mask, dtype=torch.float32) for s in states])
    finals = [next((m["content"] for m in reversed(s.messages) if m["role"] == "assistant"), "") for s in states]
    return MultiTurnRollout(completions, torch.tensor([s.reward for s in states]), finals, [s.messages for s in states], turns.prefilled)


@dataclass
class SampledTurn:
    completions: Completions
    caches: list[RowCache | None]  # each sampled row's KV cache (None where the engine keeps none)


class TurnSampler:
    """Samples turns with the rollout engine, keeping each row's KV cache where the native engine runs
    (and `resume`), and counts the tokens the engine prefilled."""

    def __init__(self, policy: torch.nn.Module, tokenizer, resume: bool):
        self.policy, self.tokenizer, self.resume = policy, tokenizer, resume
        self.prefilled = 0

    def sample(self, contexts: list[list[int]], caches: list[RowCache | None], copies: int, sampling: Sampling) -> SampledTurn:
        pad_id, eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        resumed = sample_resuming(self.policy, contexts, caches, copies, sampling, pad_id, eos_id) if self.resume else None
        if resumed is None:
            self.resume = False  # an engine that keeps no cache: every later turn prefills its episode again
            self.prefilled += sum(map(len, contexts))
            return SampledTurn(sample(self.policy, contexts, copies, sampling, pad_id, eos_id), [None] * (len(contexts) * copies))
        self.prefilled += sum(len(c) - (cache.length if cache is not None else 0) for c, cache in zip(contexts, caches))
        return SampledTurn(*resumed)


def play(states: list[EpisodeState], turn: SampledTurn, tokenizer, max_turns: int, max_length: int) -> None:
    """Each episode takes its sampled turn; a finished episode lets its cache go."""
    completions = turn.completions
    for i, state in enumerate(states):
        take_turn(state, tokenizer, completions.completion_ids[i], completions.sampler_logps[i] if completions.sampler_logps else None,
                  completions.truncated[i], max_turns, max_length)
        state.cache = None if state.done else turn.caches[i]


def longest_turns(completions: Completions) -> torch.Tensor:
    """(N,) each completion's longest run of sampled tokens: what recipe.max_new_tokens bounds, one model
    turn (a single-turn completion: its length). An episode's turns together may well pass max_new_tokens."""
    if completions.token_masks is None:
        return torch.tensor([len(ids) for ids in completions.completion_ids])
    longest = []
    for mask in completions.token_masks:
        run = best = 0
        for sampled in mask.tolist():
            run = run + 1 if sampled else 0
            best = max(best, run)
        longest.append(best)
    return torch.tensor(longest)
