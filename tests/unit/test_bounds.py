"""Declared ranges of numeric config fields (alignctl/config/bounds.py): every number has one, and the one
check reports the key, the value and the range."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from alignctl.cli.app import compose_config
from alignctl.config.bounds import parse_interval, unbounded_numeric_fields
from alignctl.config.schema import (
    ADAPTER_SCHEMAS,
    RECIPE_SCHEMAS,
    DataConfig,
    HardwareConfig,
    LoggerConfig,
    ModelConfig,
    RunConfig,
    TopLevelConfig,
)
from alignctl.config.validation import validate
from alignctl.core.errors import ConfigError

SCHEMAS = [*RECIPE_SCHEMAS.values(), *ADAPTER_SCHEMAS.values(), DataConfig, HardwareConfig, LoggerConfig, ModelConfig, TopLevelConfig, RunConfig]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_every_numeric_field_declares_a_finite_range(schema):
    assert unbounded_numeric_fields(schema) == []


def test_interval_parsing():
    lr = parse_interval("(0, 10]")
    assert not lr.contains(0) and lr.contains(1e-9) and lr.contains(10) and not lr.contains(10.5)
    assert not lr.contains(math.nan)
    assert parse_interval("[1, 1e6]").interval() == "[1, 1000000]"
    with pytest.raises(ValueError):
        parse_interval("(0, inf]")


def _validate(*overrides: str):
    return validate(OmegaConf.create(OmegaConf.to_container(compose_config(list(overrides)), resolve=True)))


@pytest.mark.parametrize("override, culprits", [
    ("recipe.lr=inf", ["recipe.lr", "inf", "(0, 10]"]),
    ("recipe.lr=nan", ["recipe.lr", "nan", "finite"]),
    ("recipe.warmup_ratio=-inf", ["recipe.warmup_ratio", "-inf", "[0, 1)"]),
    ("seed=-1", ["seed", "-1", "[0, 4294967295]"]),
    ("recipe.max_steps=100000000000", ["recipe.max_steps", "100000000000", "[0, 1000000000]"]),
    ("recipe.optimizer.eps=inf", ["recipe.optimizer.eps", "inf", "finite"]),
    ("model.tiny.init_seed=-5", ["model.tiny.init_seed", "-5"]),
    ("hardware.num_threads=0", ["hardware.num_threads", "0", "[1, 4096]"]),
])
def test_out_of_range_numbers_are_refused_naming_key_value_and_range(override, culprits):
    with pytest.raises(ConfigError) as caught:
        _validate(override)
    for culprit in culprits:
        assert culprit in str(caught.value), str(caught.value)


def test_floats_inside_lists_and_mappings_are_checked():
    with pytest.raises(ConfigError, match=r"recipe\.reward_weights\[1\].*inf"):
        _validate("recipe=grpo", "recipe.reward_funcs=[alignctl.rewards.task_verifier,alignctl.rewards.format_check]", "recipe.reward_weights=[1.0,inf]")
    with pytest.raises(ConfigError, match=r"recipe\.reward_funcs\[0\]\.weight.*nan"):
        _validate("recipe=grpo", "recipe.reward_funcs=[{_target_: alignctl.rewards.task_verifier, weight: nan}]")


def test_the_defaults_are_in_range():
    for recipe in RECIPE_SCHEMAS:
        _validate(f"recipe={recipe}")
