"""Multi-turn rollouts (alignctl.rl.multi_turn) on a tiny random Llama with the character tokenizer:
the token mask, the sampler's log-probs against one forward, max turns, tool errors reaching the model,
and environment and tool tokens carrying no loss, no KL and no advantage."""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignctl.config.recipe_schema import RolloutEngine
from alignctl.models.tokenizer import build_char_tokenizer
from alignctl.nn.logprobs import response_token_logps
from alignctl.nn.losses import aggregate, gae, kl_penalty, policy_surrogate
from alignctl.rl.environments import EnvironmentSpec, StepResult, ToolEnv, load_environment
from alignctl.rl.multi_turn import longest_turns, reply_text, sample_episodes
from alignctl.rl.online_rl import completion_tokens, greedy_episodes, model_turns, rollout_metrics
from alignctl.rl.rollout import Completions, Sampling, policy_mask, training_batch
from alignctl.rl.tools import calculator
from alignctl.train.evaluate import greedy_ids

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def policy(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config).eval()


class Countdown:
    """Replies "ok" until its `turns` are used up; 0.5 reward a step."""

    def __init__(self, turns: int = 100):
        self.left = turns

    def reset(self, row: dict) -> None:
        self.row = row

    def step(self, turn: str) -> StepResult:
        self.left -= 1
        return StepResult("ok", self.left <= 0, 0.5)


def hang(x: str) -> str:
    """Does not return in time."""
    time.sleep(5)
    return x


class BrokenTools(ToolEnv):
    """Calls a failing tool, then a hanging one, whatever the model writes."""

    default_tools = (calculator,)
    calls = ("<tool>calculator: 1//0</tool>", "<tool>hang: x</tool>")

    def __init__(self):
        super().__init__(tools=["tests.unit.test_multi_turn.hang"], timeout=0.05)
        self.turn = 0

    def step(self, turn: str) -> StepResult:
        self.turn += 1
        if self.turn > len(self.calls):
            return StepResult(None, True, 1.0)
        return super().step(self.calls[self.turn - 1])


def spec_of(cls, max_turns: int, **kwargs) -> EnvironmentSpec:
    return EnvironmentSpec(cls.__name__, lambda: cls(**kwargs), max_turns, [])


def rows(tokenizer, prompts: list) -> dict[str, list]:
    from alignctl.data.encode import encode_prompt

    return {"prompt": prompts, "prompt_ids": [encode_prompt(tokenizer, p) for p in prompts], "answer": ["1"] * len(prompts)}


SAMPLING = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6, engine="hf")


@pytest.mark.parametrize("engine", ["hf", "native"])
@pytest.mark.parametrize("conversational", [False, True])
def test_an_episode_s_sampler_log_probs_equal_one_forward_over_its_tokens(tokenizer, policy, engine, conversational):
    torch.manual_seed(1)
    prompts = [[{"role": "user", "content": "1+2="}], [{"role": "user", "content": "33+4="}]] if conversational else ["1+2=", "33+4="]
    sampling = Sampling(1.0, 1.0, 0, 6, engine)
    episodes = sample_episodes(policy, tokenizer, rows(tokenizer, prompts), 2, sampling, spec_of(Countdown, 3), max_length=200)
    completions = episodes.completions
    assert len(completions.completion_ids) == 4 and completions.engine == engine
    batch = training_batch(completions, range(4), tokenizer.pad_token_id, CPU, {"sampler_logps": completions.sampler_logps}, {})
    with torch.no_grad():
        logps, response_mask, _ = response_token_logps(policy, batch)
    sampled = policy_mask(batch, response_mask)
    assert 0 < sampled.sum() < response_mask.sum()  # the environment's tokens are in the response, outside the policy's mask
    torch.testing.assert_close(logps * sampled, batch["sampler_logps"] * sampled, atol=1e-4, rtol=1e-4)
    assert torch.all(batch["sampler_logps"][sampled == 0] == 0)
    for mask, ids in zip(completions.token_masks, completions.completion_ids):
        assert model_turns(mask) == 3 and len(mask) == len(ids)
        reply = tokenizer.decode([t for t, m in zip(ids, mask.tolist()) if m == 0])
        assert reply.count("ok") == 2 and ("<|tool|>" in reply) == conversational and ("<result>" in reply) != conversational
    assert episodes.env_rewards.tolist() == [1.5] * 4
    assert [len(e) for e in episodes.episodes] == [5] * 4  # assistant, tool, assistant, tool, assistant


def test_max_turns_is_honoured_whichever_asks_for_fewer(tokenizer, policy):
    torch.manual_seed(2)
    episodes = sample_episodes(policy, tokenizer, rows(tokenizer, ["5+5="]), 3, SAMPLING, spec_of(Countdown, 2), max_length=200)
    assert [model_turns(m) for m in episodes.completions.token_masks] == [2, 2, 2]
    assert episodes.env_rewards.tolist() == [1.0] * 3
    episodes = sample_episodes(policy, tokenizer, rows(tokenizer, ["5+5="]), 2, SAMPLING, spec_of(Countdown, 9, turns=1), max_length=200)
    assert [model_turns(m) for m in episodes.completions.token_masks] == [1, 1]
    assert all(m.all() for m in episodes.completions.token_masks)  # one turn, no reply appended


def test_an_episode_stops_at_max_length(tokenizer, policy):
    torch.manual_seed(3)
    prompt_ids = rows(tokenizer, ["5+5="])["prompt_ids"][0]
    episodes = sample_episodes(policy, tokenizer, rows(tokenizer, ["5+5="]), 2, SAMPLING, spec_of(Countdown, 50), max_length=40)
    for ids, truncated in zip(episodes.completions.completion_ids, episodes.completions.truncated):
        assert len(prompt_ids) + len(ids) <= 40 and truncated


def test_an_episode_near_max_length_does_not_shorten_the_others_turns(tokenizer, policy):
    """Two episodes in one batch, one long prompt with 3 tokens of room left for its second turn: the
    short one's turns still run to max_new_tokens (or its EOS)."""
    torch.manual_seed(5)
    prompts = ["1" * 60 + "=", "5+5="]  # the short episode never nears max_length itself
    data = rows(tokenizer, prompts)
    reply = len(tokenizer("<result>ok</result>", add_special_tokens=False)["input_ids"])
    max_length = len(data["prompt_ids"][0]) + SAMPLING.max_new_tokens + reply + 3
    episodes = sample_episodes(policy, tokenizer, data, 1, SAMPLING, spec_of(Countdown, 3), max_length=max_length)
    long_ids, short_ids = episodes.completions.completion_ids
    long_mask, short_mask = episodes.completions.token_masks
    assert len(data["prompt_ids"][0]) + len(long_ids) <= max_length
    assert model_turns(short_mask) == 3
    turns, run = [], []
    for token, sampled in zip(short_ids, short_mask.tolist()):
        if sampled:
            run.append(token)
        elif run:
            turns, run = turns + [run], []
    turns.append(run)
    for turn in turns:  # cut only by max_new_tokens, or ended by the model
        assert len(turn) == SAMPLING.max_new_tokens or turn[-1] == tokenizer.eos_token_id, turns


def test_tool_errors_and_timeouts_reach_the_model_as_tool_messages(tokenizer, policy):
    torch.manual_seed(4)
    prompts = [[{"role": "user", "content": "1+2="}]]
    episodes = sample_episodes(policy, tokenizer, rows(tokenizer, prompts), 1, SAMPLING, spec_of(BrokenTools, 5), max_length=300)
    ids, mask = episodes.completions.completion_ids[0], episodes.completions.token_masks[0]
    replies = tokenizer.decode([t for t, m in zip(ids, mask.tolist()) if m == 0])
    assert "<|tool|>error: calculator raised ZeroDivisionError" in replies
    assert "<|tool|>error: hang timed out after 0.05 seconds" in replies
    assert model_turns(mask) == 3 and episodes.env_rewards.tolist() == [1.0]
    assert [m["role"] for m in episodes.episodes[0]] == ["assistant", "tool", "assistant", "tool", "assistant"]


def test_a_reply_is_a_tool_message_rendered_by_the_template(tokenizer):
    conversation = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "<tool>calculator: 1+2</tool>"}]
    # The tiny template closes a turn with <|end|>; the model sampled it (and EOS) itself, so it is not repeated.
    assert reply_text(tokenizer, conversation, "<|end|></s>", "3") == "<|tool|>3<|end|><|assistant|>"
    assert reply_text(tokenizer, conversation, "", "3") == "<|end|><|tool|>3<|end|><|assistant|>"  # a turn cut short is closed
    assert reply_text(tokenizer, "1+2=", "</s>", "3") == "<result>3</result>"
    import copy

    strict = copy.deepcopy(tokenizer)  # a template that knows no tool role
    strict.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('roles!') }}{% endif %}"
                            "{% endfor %}" + tokenizer.chat_template)
    assert reply_text(strict, conversation, "<|end|></s>", "3") == "<result>3</result>"


# ------------------------------------------------------------- the mask, token by token, on a hand-built episode
def hand_built_episode() -> tuple[Completions, torch.Tensor]:
    """One prompt, then: 3 sampled tokens, 2 environment tokens, 2 sampled; and a single-turn row of 4."""
    masks = [torch.tensor([1.0, 1, 1, 0, 0, 1, 1]), torch.ones(4)]
    completions = Completions([[1, 5, 6], [1, 7]], [[10, 11, 12, 20, 21, 13, 2], [14, 15, 16, 2]], [False, False], token_masks=masks)
    return completions, masks


def test_environment_tokens_carry_no_loss_and_no_kl_token_by_token():
    completions, masks = hand_built_episode()
    batch = training_batch(completions, [0, 1], 0, CPU, {"ref_logps": [torch.full((7,), -2.0), torch.full((4,), -2.0)]}, {})
    width = 7
    expected = torch.stack([masks[0], torch.cat([torch.zeros(3), masks[1]])])
    response_mask = batch["response_mask"][:, -width:].float()
    mask = policy_mask(batch, response_mask)
    assert torch.equal(mask, expected) and completion_tokens(batch) == 9
    logps = torch.full((2, width), -1.0, requires_grad=True)
    advantages = torch.tensor([1.0, -0.5])
    surrogate = policy_surrogate("ppo_clip", logps, logps.detach(), mask, advantages, 0.2, None)
    for name, per_token in {"loss": surrogate.loss, "kl": kl_penalty(logps, batch["ref_logps"], "k3")}.items():
        logps.grad = None
        aggregate(per_token, mask, "token", completion_tokens(batch)).backward(retain_graph=True)
        assert torch.equal(logps.grad != 0, expected.bool()), name  # a gradient at every sampled token, none elsewhere


def test_advantages_skip_the_environment_s_tokens_and_reach_earlier_turns():
    mask = torch.tensor([[1.0, 1, 0, 0, 1]])
    rewards = torch.tensor([[0.0, 0, 0, 0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # With gamma = lam = 1: the reward to go minus the value, as if the reply were not there.
    torch.testing.assert_close(advantages, torch.tensor([[0.9, 0.8, 0.0, 0.0, 0.7]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]]))


def test_calculator_env_runs_calls_in_the_plain_markup():
    env = load_environment("alignctl.rl.environments.CalculatorEnv", {}, 4).new({"prompt": "1+2="}, "plain")
    assert env.step("<tool>calculator: 347+89</tool>") == StepResult("436", False, 0.0)
    assert env.step("<tool>calculator: 1/2</tool>").reply.startswith("error: calculator raised ValueError")
    assert env.step("0436") == StepResult(None, True, 0.0)
    hermes = load_environment("alignctl.rl.environments.CalculatorEnv", {}, 4).new({}, "hermes")
    assert hermes.step('<tool_call>{"name": "calculator", "arguments": {"expression": "2*21"}}</tool_call>').reply == "42"


def test_a_tool_that_cannot_be_imported_stops_the_run_naming_it():
    from alignctl.rl.environments import EnvironmentFailure

    with pytest.raises(EnvironmentFailure, match=r"^recipe.environment_kwargs.tools: cannot import 'no_such.tool' \(ModuleNotFoundError"):
        load_environment("alignctl.rl.environments.ToolEnv", {"tools": ["no_such.tool"]}, 4)
    with pytest.raises(EnvironmentFailure, match=r"environment alignctl.rl.environments.ToolEnv: ToolEnv\(\*\*recipe.environment_kwargs\) raised TypeError"):
        load_environment("alignctl.rl.environments.ToolEnv", {"colour": "red"}, 4)


def test_a_template_that_takes_tools_declares_them_in_the_prompt(tokenizer):
    import copy

    from alignctl.data.encode import encode_prompt
    from alignctl.rl.tools import Tool, call_format

    declaring = copy.deepcopy(tokenizer)
    declaring.chat_template = ("{% if tools %}<|system|>Call <tool_call>{name, arguments}</tool_call>: {{ tools | tojson }}<|end|>{% endif %}"
                               + tokenizer.chat_template)
    messages = [{"role": "user", "content": "1+2="}]
    tools = [Tool(calculator).schema()]
    text = declaring.decode(encode_prompt(declaring, messages, tools))
    assert text.startswith('<|system|>Call <tool_call>{name, arguments}</tool_call>: [{"type": "function", "function": {"name": "calculator"')
    assert call_format(declaring.chat_template) == "hermes" and call_format(tokenizer.chat_template) == "plain"
    assert encode_prompt(declaring, messages) == encode_prompt(tokenizer, messages)  # no tools: nothing declared


def test_distill_refuses_an_environment_in_one_line():
    """distill has no multi-turn episodes: an environment there would be ignored, so it is refused."""
    from omegaconf import OmegaConf

    from alignctl.cli.app import compose_config
    from alignctl.config.validation import validate
    from alignctl.core.errors import ConfigError

    composed = compose_config(["recipe=distill", "recipe.environment=alignctl.rl.environments.CalculatorEnv"])
    with pytest.raises(ConfigError) as caught:
        validate(OmegaConf.create(OmegaConf.to_container(composed, resolve=True)))
    message = str(caught.value)
    assert "\n" not in message and "recipe.environment" in message and "recipe=grpo" in message and "environment=null" in message, message


def test_the_overlong_penalty_reads_an_episode_s_longest_turn():
    """recipe.overlong_buffer punishes turns near max_new_tokens (the per-turn bound): three turns of 3
    tokens under a 4-token limit are not overlong, though they sample 9 tokens together."""
    from alignctl.nn.losses import overlong_penalty

    episode = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.float32)
    cut = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.float32)  # its second turn ran to the limit
    multi = Completions([[1], [1]], [[5] * 12, [5] * 7], [False, True], "hf", token_masks=[episode, cut])
    assert longest_turns(multi).tolist() == [3, 4]
    assert overlong_penalty(longest_turns(multi), 4, 2).tolist() == [-0.5, -1.0]
    single = Completions([[1], [1]], [[5] * 2, [5] * 4], [False, True], "hf")
    assert longest_turns(single).tolist() == [2, 4]


def test_the_length_reward_correlation_reads_the_policy_s_tokens():
    """The guard's length-bias signal: episodes that called a tool more (longer results) and scored higher
    are not the policy writing longer; here its own tokens are the same length in every episode."""
    masks = [torch.tensor([1.0] * 4 + [0.0] * n + [1.0] * 4) for n in (2, 10, 20, 40)]
    completions = Completions([[1]] * 4, [[5] * len(m) for m in masks], [False] * 4, "hf", token_masks=masks)
    metrics = rollout_metrics(torch.tensor([0.0, 1.0, 2.0, 3.0]), {}, completions, 1)
    assert metrics["completions/length_reward_corr"] == 0.0  # sampled lengths constant: no length bias
    assert metrics["completions/mean_sampled_length"] == 8.0 and metrics["completions/mean_length"] == 26.0


def test_an_environment_that_calls_sys_exit_is_one_line_naming_it():
    """SystemExit is not an Exception: uncaught, sys.exit() in user code ended the run with exit code 0."""
    import sys

    from alignctl.rl.environments import EnvironmentFailure, Episode

    class Exits:
        def __init__(self, at: str = "step"):
            if at == "init":
                sys.exit()
            self.at = at

        def reset(self, row: dict) -> None:
            if self.at == "reset":
                sys.exit(0)

        def step(self, turn: str) -> StepResult:
            sys.exit("bye")

    with pytest.raises(EnvironmentFailure, match=r"^environment Exits: step raised SystemExit: bye$"):
        Episode("Exits", Exits()).step("hi")
    with pytest.raises(EnvironmentFailure, match=r"^environment Exits: reset raised SystemExit"):
        Episode("Exits", Exits("reset")).reset({})
    with pytest.raises(EnvironmentFailure, match=r"^environment Exits: Exits\(\*\*recipe.environment_kwargs\) raised SystemExit"):
        EnvironmentSpec("Exits", lambda: Exits("init"), 2, []).new({}, "plain")


def test_one_tool_path_without_brackets_is_a_list_of_one():
    """+recipe.environment_kwargs.tools=mypkg.lookup gives a string: each of its characters was taken for
    a path ("'t' is not a dotted path")."""
    env = ToolEnv(tools="tests.unit.test_multi_turn.hang")
    assert sorted(env.by_name) == ["hang"]


def test_a_plain_text_prompt_reads_calls_in_the_plain_markup_whatever_the_template(tokenizer, policy):
    """A template that declares <tool_call> (Qwen2.5) sets the hermes markup for conversations only: a
    plain-text prompt never shows the model the template's tool declarations."""
    import copy

    markups = []

    class Records(ToolEnv):
        def step(self, turn: str) -> StepResult:
            markups.append(self.markup)
            return StepResult(None, True, 0.0)

    declaring = copy.deepcopy(tokenizer)
    declaring.chat_template = "{% if tools %}<tool_call>{{ tools | tojson }}</tool_call>{% endif %}" + tokenizer.chat_template
    prompts = ["1+2=", [{"role": "user", "content": "1+2="}]]
    torch.manual_seed(6)
    sample_episodes(policy, declaring, rows(declaring, prompts), 1, SAMPLING, spec_of(Records, 2), max_length=100)
    assert markups == ["plain", "hermes"]


# ------------------------------------------------------------- KV caches kept between turns (the native engine)
@pytest.fixture(scope="module")
def eos_prone(policy, tokenizer):
    """The policy with a sharper head and EOS more likely: turns end at EOS at different steps, some run
    to max_new_tokens, so rows leave the batch mid-turn."""
    import copy

    model = copy.deepcopy(policy)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        model.lm_head.weight[tokenizer.eos_token_id] *= 3.0
    return model


def staggered(max_turns: int = 4) -> EnvironmentSpec:
    """Episodes that end after 1, 2, ..., max_turns turns, in turn: they leave the batch at different turns."""
    made = iter(range(10**6))
    return EnvironmentSpec("Staggered", lambda: Countdown(1 + next(made) % max_turns), max_turns, [])


def both_ways(model, tokenizer, prompts, sampling, spec_factory, max_length=200, group=3):
    """The same rollout with kept caches and with every turn prefilled again, from the same seed."""
    out = {}
    for resume in (True, False):
        torch.manual_seed(7)
        out[resume] = sample_episodes(model, tokenizer, rows(tokenizer, prompts), group, sampling, spec_factory(), max_length=max_length, resume=resume)
    return out[True], out[False]


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("conversational", [False, True])
def test_kept_caches_sample_what_prefilling_every_turn_samples(tokenizer, eos_prone, greedy, conversational):
    prompts = [[{"role": "user", "content": "1+2="}], [{"role": "user", "content": "33+4="}]] if conversational else ["1+2=", "33+4="]
    sampling = Sampling(1.0, 1.0, 1 if greedy else 0, 6, "native")
    resumed, prefilled = both_ways(eos_prone, tokenizer, prompts, sampling, staggered)
    ours, theirs = resumed.completions, prefilled.completions
    assert ours.engine == theirs.engine == "native"
    assert ours.completion_ids == theirs.completion_ids and ours.truncated == theirs.truncated
    assert all(torch.equal(a, b) for a, b in zip(ours.token_masks, theirs.token_masks))
    for a, b in zip(ours.sampler_logps, theirs.sampler_logps):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert resumed.env_rewards.tolist() == prefilled.env_rewards.tolist() and resumed.episodes == prefilled.episodes
    turns = [model_turns(m) for m in ours.token_masks]
    assert sorted(set(turns)) == [1, 2, 3, 4], turns  # episodes left the batch at every turn
    eos = tokenizer.eos_token_id
    ended = [ids[i] == eos for ids, mask in zip(ours.completion_ids, ours.token_masks) for i in range(len(ids))
             if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
    assert any(ended) and not all(ended)  # turns ended at EOS and at max_new_tokens
    # Far fewer tokens prefilled (how many fewer depends on the turns the episodes sampled).
    assert resumed.prefill_tokens < 0.6 * prefilled.prefill_tokens, (resumed.prefill_tokens, prefilled.prefill_tokens)


def test_kept_caches_match_the_trainer_s_forward_over_the_episode(tokenizer, eos_prone):
    torch.manual_seed(8)
    prompts = [[{"role": "user", "content": "1+2="}], "33+4="]
    episodes = sample_episodes(eos_prone, tokenizer, rows(tokenizer, prompts), 2, Sampling(1.0, 1.0, 0, 6, "native"), staggered(), max_length=200)
    completions = episodes.completions
    batch = training_batch(completions, range(4), tokenizer.pad_token_id, CPU, {"sampler_logps": completions.sampler_logps}, {})
    with torch.no_grad():
        logps, response_mask, _ = response_token_logps(eos_prone, batch)
    sampled = policy_mask(batch, response_mask)
    torch.testing.assert_close(logps * sampled, batch["sampler_logps"] * sampled, atol=1e-4, rtol=1e-4)


def test_kept_caches_agree_when_an_episode_nears_max_length(tokenizer, policy):
    """Turns bounded by an episode's own room (several sampling calls a turn) resume their caches too."""
    data = ["1" * 60 + "=", "5+5="]
    reply = len(tokenizer("<result>ok</result>", add_special_tokens=False)["input_ids"])
    max_length = len(rows(tokenizer, data)["prompt_ids"][0]) + SAMPLING.max_new_tokens + reply + 3
    sampling = replace(SAMPLING, engine="native")
    resumed, prefilled = both_ways(policy, tokenizer, data, sampling, lambda: spec_of(Countdown, 3), max_length=max_length, group=1)
    assert resumed.completions.completion_ids == prefilled.completions.completion_ids
    assert resumed.completions.truncated == prefilled.completions.truncated and resumed.completions.truncated[0]  # the long one cut at max_length
    for a, b in zip(resumed.completions.sampler_logps, prefilled.completions.sampler_logps):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def later_turn_starts(mask: torch.Tensor) -> list[int]:
    """Where each turn after the first begins in an episode's completion."""
    values = mask.tolist()
    return [i for i in range(1, len(values)) if values[i] and not values[i - 1]]


def test_prefill_tokens_count_what_each_engine_prefilled(tokenizer, policy):
    """Kept caches: each prompt once, then per later turn the last sampled token and the reply. Prefilled
    again (hf): each prompt once, then per later turn the whole episode so far."""
    data = rows(tokenizer, ["1+2=", "33+4="])
    prompts = sum(len(ids) for ids in data["prompt_ids"])
    for engine in ("native", "hf"):
        torch.manual_seed(9)
        episodes = sample_episodes(policy, tokenizer, data, 2, replace(SAMPLING, engine=engine), spec_of(Countdown, 3), max_length=200)
        completions = episodes.completions
        starts = [(len(p), later_turn_starts(m)) for p, m in zip(completions.prompt_ids, completions.token_masks)]
        if engine == "native":
            replies = sum(int((m == 0).sum()) for m in completions.token_masks)
            assert episodes.prefill_tokens == prompts + replies + sum(len(s) for _, s in starts)
        else:
            assert episodes.prefill_tokens == prompts + sum(prompt + start for prompt, s in starts for start in s)


def test_greedy_evaluation_episodes_are_deterministic_and_their_first_turn_is_the_greedy_completion(tokenizer, policy):
    rows = [{"prompt": p, "answer": "0"} for p in ("12+34=", "5+6=", "700+1=")]
    recipe = SimpleNamespace(max_new_tokens=5, eval_batch_size=2, rollout_engine=RolloutEngine.native, max_length=60)
    spec = EnvironmentSpec("Countdown", lambda: Countdown(turns=2), 3, [])
    ids, finals, extra, env_rewards = greedy_episodes(policy, tokenizer, rows, recipe, spec)
    assert greedy_episodes(policy, tokenizer, rows, recipe, spec)[:3] == (ids, finals, extra)
    assert [sum(m["role"] == "assistant" for m in e) for e in extra["episode"]] == [2, 2, 2]
    assert env_rewards.tolist() == [1.0, 1.0, 1.0]  # two steps of 0.5 each
    first_turns = greedy_ids(policy, tokenizer, [r["prompt"] for r in rows], 5, 8)
    assert [e[0]["content"] for e in extra["episode"]] == tokenizer.batch_decode(first_turns, skip_special_tokens=True)
