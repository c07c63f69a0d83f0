"""alignctl.rewards: the built-in reward functions, loading user functions by dotted path (plain or as
a {_target_, weight, **kwargs} mapping), weighting, and the errors a misbehaving function gets."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from alignctl.rewards import format_check, length_penalty, task_verifier
from alignctl.rl.reward_sources import RewardError, combined_rewards, function_sources

# tests/ is not a package, so the user functions live in a module written to a temporary directory.
USER_MODULE = "alignctl_test_user_rewards"
USER_CODE = """
import math

import numpy as np


def answer_length(prompts, completions, answer, **_):
    return [float(len(a)) for a in answer]


def boom(prompts, completions, **_):
    raise ZeroDivisionError("division by nothing")


def too_few(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)


def nothing(prompts, completions, **_):
    return None


def a_string(prompts, completions, **_):
    return ["1.0"] + [0.0] * (len(completions) - 1)


def not_a_number(prompts, completions, **_):
    return [math.nan] + [0.0] * (len(completions) - 1)


def infinite(prompts, completions, **_):
    return [math.inf] * len(completions)


def numpy_array(prompts, completions, **_):
    return np.arange(len(completions), dtype=np.float32) / 2


def numpy_scalars(prompts, completions, **_):
    return [np.float64(0.25) * i for i in range(len(completions))]


def numpy_bools(prompts, completions, **_):
    return np.array([len(c) > 1 for c in completions])


def python_bools(prompts, completions, **_):
    return [len(c) > 1 for c in completions]


def a_scalar(prompts, completions, **_):
    return 1.0


NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The dotted-path prefix of a temporary, importable module of user reward functions."""
    (tmp_path / f"{USER_MODULE}.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(USER_MODULE, None)
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


PROMPTS = ["347+089="] * 4
COMPLETIONS = ["0436", "0436\nextra", "0437", ""]
COLUMNS = {"answer": ["0436"] * 4}


def _score(entry, completions=COMPLETIONS, columns=COLUMNS, weights=None) -> torch.Tensor:
    (source,) = function_sources([entry], weights)
    return source.score(["p"] * len(completions), list(completions), columns)


# ---------------------------------------------------------------------------------- built-ins
def test_task_verifier_matches_the_first_line_exactly():
    assert task_verifier(prompts=PROMPTS, completions=COMPLETIONS, answer=["0436"] * 4) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    assert task_verifier(prompts=["1+2="], completions=[" 0003 \n"], answer=["0003"]) == [1.0]
    assert task_verifier(prompts=["1+2="], completions=["3"], answer=["0003"]) == [0.0]


def test_format_check_wants_one_line_of_digits_by_default():
    completions = ["0436", " 12 \n", "12a", "1\n2", "", "-5"]
    assert format_check(prompts=["p"] * 6, completions=completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_format_check_takes_a_pattern_and_still_wants_one_line():
    assert format_check(prompts=["p"] * 3, completions=["x=12", "12", "x="], pattern=r"x=\d+") == [
        1.0,
        0.0,
        0.0,
    ]
    # a pattern that accepts newlines still fails a multi-line completion
    assert format_check(prompts=["p"] * 2, completions=["ab", "a\nb"], pattern=r"(?s).+") == [1.0, 0.0]


def test_length_penalty_counts_the_characters_beyond_the_limit():
    assert length_penalty(prompts=["p"] * 3, completions=["12345678", "123456789012", ""]) == [0.0, -0.5, 0.0]
    assert length_penalty(prompts=["p"] * 2, completions=["abcd", "a"], max_chars=2) == [-1.0, 0.0]


def test_builtins_ignore_extra_columns():
    assert format_check(prompts=["p"], completions=["7"], answer=["0007"]) == [1.0]
    assert length_penalty(prompts=["p"], completions=["7"], answer=["0007"]) == [0.0]


# ---------------------------------------------------------------------------- function_sources
def test_a_dotted_path_is_a_source_of_weight_one():
    (source,) = function_sources(["alignctl.rewards.task_verifier"], None)
    assert source.name == "task_verifier"
    assert source.weight == 1.0
    scores = source.score(PROMPTS, COMPLETIONS, COLUMNS)
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_a_module_colon_function_path_works_too():
    torch.testing.assert_close(_score("alignctl.rewards:task_verifier"), torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_a_mapping_binds_keyword_arguments_and_sets_the_weight():
    entry = {"_target_": "alignctl.rewards.length_penalty", "weight": 0.5, "max_chars": 2}
    (source,) = function_sources([entry], None)
    assert source.name == "length_penalty"
    assert source.weight == 0.5
    # max_chars 2 (not the default 8): "0436" is 2 characters over -> -1
    torch.testing.assert_close(source.score(["p"] * 2, ["0436", "ab"], {}), torch.tensor([-1.0, 0.0]))


def test_a_mapping_without_weight_weighs_one_and_without_kwargs_keeps_the_defaults():
    (source,) = function_sources([{"_target_": "alignctl.rewards.length_penalty"}], None)
    assert source.weight == 1.0
    torch.testing.assert_close(source.score(["p"], ["0436"], {}), torch.tensor([0.0]))


def test_reward_weights_override_every_entry():
    entries = [
        "alignctl.rewards.task_verifier",
        {"_target_": "alignctl.rewards.length_penalty", "weight": 0.5, "max_chars": 2},
    ]
    sources = function_sources(entries, [2.0, 3.0])
    assert [(s.name, s.weight) for s in sources] == [("task_verifier", 2.0), ("length_penalty", 3.0)]


def test_reward_weights_must_match_the_functions():
    with pytest.raises(RewardError, match="2 values for 1 reward functions"):
        function_sources(["alignctl.rewards.task_verifier"], [1.0, 2.0])


def test_an_entry_that_is_neither_a_path_nor_a_target_mapping_is_an_error():
    with pytest.raises(RewardError, match=r"reward_funcs\[1\]"):
        function_sources(["alignctl.rewards.task_verifier", {"weight": 1.0}], None)


def test_a_user_function_gets_the_dataset_columns(user):
    torch.testing.assert_close(
        _score(f"{user}.answer_length", columns={"answer": ["1", "22", "333", ""]}),
        torch.tensor([1.0, 2.0, 3.0, 0.0]),
    )


# ---------------------------------------------------------------------------- combined_rewards
def test_combined_rewards_are_the_weighted_sum_with_each_source_by_name():
    entries = [
        "alignctl.rewards.task_verifier",
        {"_target_": "alignctl.rewards.length_penalty", "max_chars": 2},
    ]
    sources = function_sources(entries, [2.0, 0.5])
    total, per_source = combined_rewards(sources, PROMPTS, COMPLETIONS, COLUMNS)
    verifier = torch.tensor([1.0, 1.0, 0.0, 0.0])
    penalty = torch.tensor([-1.0, -4.0, -1.0, 0.0])  # lengths 4, 10, 4, 0 over max_chars 2
    assert set(per_source) == {"task_verifier", "length_penalty"}
    torch.testing.assert_close(per_source["task_verifier"], verifier)
    torch.testing.assert_close(per_source["length_penalty"], penalty)
    torch.testing.assert_close(total, 2.0 * verifier + 0.5 * penalty)


def test_one_function_with_two_settings_counts_both():
    entries = [
        "alignctl.rewards.length_penalty",
        {"_target_": "alignctl.rewards.length_penalty", "max_chars": 2},
    ]
    total, per_source = combined_rewards(function_sources(entries, None), ["p"], ["abcd"], {})
    # max_chars 8: 0; max_chars 2: -1
    assert len(per_source) == 2
    torch.testing.assert_close(total, torch.tensor([-1.0]))


# --------------------------------------------------------------------------- accepted numbers
def test_numpy_floats_are_accepted(user):
    torch.testing.assert_close(_score(f"{user}.numpy_array"), torch.tensor([0.0, 0.5, 1.0, 1.5]))
    torch.testing.assert_close(_score(f"{user}.numpy_scalars"), torch.tensor([0.0, 0.25, 0.5, 0.75]))


def test_python_bools_count_as_zero_and_one(user):
    torch.testing.assert_close(_score(f"{user}.python_bools"), torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_numpy_bools_count_as_zero_and_one(user):
    torch.testing.assert_close(_score(f"{user}.numpy_bools"), torch.tensor([1.0, 1.0, 1.0, 0.0]))


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "function, detail",
    [
        ("boom", "raised ZeroDivisionError: division by nothing"),
        ("too_few", "one number per completion (4), got 3 values"),
        ("nothing", "got None"),
        ("a_string", "returned '1.0'"),
        ("not_a_number", "returned nan"),
        ("infinite", "returned inf"),
    ],
)
def test_a_misbehaving_function_is_a_reward_error_naming_it(user, function, detail):
    with pytest.raises(RewardError) as caught:
        _score(f"{user}.{function}")
    assert f"{user}.{function}" in str(caught.value)
    assert detail in str(caught.value)


def test_a_function_returning_a_scalar_is_a_reward_error_naming_it(user):
    with pytest.raises(RewardError, match=f"{user}.a_scalar"):
        _score(f"{user}.a_scalar")


@pytest.mark.parametrize(
    "path",
    ["alignctl_no_such_module_xyz.score", "alignctl.rewards.no_such_function", "no_dots_at_all"],
)
def test_an_unimportable_path_is_a_reward_error_naming_it(path):
    with pytest.raises(RewardError) as caught:
        function_sources(["alignctl.rewards.task_verifier", path], None)
    assert repr(path) in str(caught.value)
    assert "recipe.reward_funcs[1]" in str(caught.value)


def test_an_unimportable_mapping_target_is_a_reward_error_naming_it():
    with pytest.raises(RewardError, match="alignctl.rewards.nope"):
        function_sources([{"_target_": "alignctl.rewards.nope", "max_chars": 2}], None)


def test_a_path_to_something_not_callable_is_a_reward_error(user):
    with pytest.raises(RewardError, match=f"{user}.NOT_A_FUNCTION' is not callable"):
        function_sources([f"{user}.NOT_A_FUNCTION"], None)
