"""The config tree and the CLI's read-only commands: every option composes and validates, --help
lists what exists, --cfg job prints the config without training, and the documented keys override."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import DictConfig, OmegaConf

from alignctl.cli import app as hydra_app
from alignctl.config import schema, validation

# What a valid config needs beyond the group option itself (options with required `???` values).
REQUIRED_EXTRAS = {
    ("model", "hf"): ["model.name_or_path=some-org/some-model"],
    ("data", "hf"): ["data.path=/data/train.jsonl"],
}
GROUP_OPTIONS = [(group, option) for group in hydra_app.groups() for option in hydra_app.group_options(group)]


def schema_for(group: str, node: DictConfig) -> type:
    """The dataclass that validates a composed group node."""
    fixed = {
        "model": schema.ModelConfig,
        "data": schema.DataConfig,
        "hardware": schema.HardwareConfig,
        "logger": schema.LoggerConfig,
    }
    if group == "recipe":
        return schema.RECIPE_SCHEMAS[node.stage]
    if group == "adapter":
        return schema.ADAPTER_SCHEMAS[node.kind]
    assert group in fixed, f"config group {group!r} has no schema in alignctl.config.schema (add it to validate())"
    return fixed[group]


def test_groups_and_options_exist():
    assert {"recipe", "model", "adapter", "data", "hardware", "logger"} <= set(hydra_app.groups())
    assert "sft" in hydra_app.group_options("recipe")
    assert "_train" not in hydra_app.group_options("recipe"), "'_' files are fragments, not options"
    assert {"none", "lora"} <= set(hydra_app.group_options("adapter"))


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_and_validates(group, option):
    cfg = hydra_app.compose_config([f"{group}={option}", *REQUIRED_EXTRAS.get((group, option), [])])
    run = validation.validate(cfg)
    section = getattr(run, group)
    assert isinstance(section, schema_for(group, cfg[group]))


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_fields_match_schema(group, option):
    """Each option spells out every field of its dataclass (no silent MISSING) and nothing else."""
    cfg = hydra_app.compose_config([f"{group}={option}"])
    node = cfg[group]
    cls = schema_for(group, node)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields - set(node.keys()) == set(), f"{group}={option} leaves out {sorted(fields - set(node.keys()))}"
    assert set(node.keys()) - fields == set(), f"{group}={option} has keys {sorted(set(node.keys()) - fields)} unknown to {cls.__name__}"
    required = {k for k in node if OmegaConf.is_missing(node, k)}
    assert required == {k.split("=", 1)[0].split(".", 1)[1] for k in REQUIRED_EXTRAS.get((group, option), [])}, (
        f"{group}={option}: unexpected required (???) values {sorted(required)}"
    )
    if group == "model" and node.tiny is not None:
        tiny = {f.name for f in dataclasses.fields(schema.TinyModelConfig)}
        assert set(node.tiny.keys()) == tiny


def test_every_conf_file_parses():
    files = [p for p in hydra_app.conf_dir().rglob("*.yaml") if not p.name.startswith("_")]
    assert len(files) >= len(GROUP_OPTIONS) + 1
    for path in files:
        assert isinstance(OmegaConf.load(path), DictConfig), path
    top = OmegaConf.load(hydra_app.conf_dir() / "config.yaml")
    run_fields = {f.name for f in dataclasses.fields(schema.RunConfig)}
    assert run_fields - {"recipe", "model", "adapter", "data", "hardware", "logger"} <= set(top.keys())


def test_help_lists_commands_groups_and_recipes(alignctl):
    result = alignctl("--help", timeout=120)
    assert result.returncode == 0, result.describe()
    assert "train" in result.stdout
    for group in hydra_app.groups():
        assert group in result.stdout
        groups_section = result.stdout.split("config groups", 1)[1]  # `data` is also a command
        line = next(ln for ln in groups_section.splitlines() if ln.strip().startswith(group + " "))
        for option in hydra_app.group_options(group):
            assert option in line, f"{option} missing from: {line}"
    assert "recipes" in result.stdout
    for recipe in hydra_app.recipes_dir().glob("*.yaml"):
        assert recipe.stem in result.stdout
    assert alignctl(timeout=120).stdout == result.stdout, "no arguments prints the same usage"


def test_cfg_job_prints_config_and_trains_nothing(alignctl, tmp_path):
    run_dir = tmp_path / "run"
    result = alignctl("train", "--cfg", "job", "recipe.lr=0.5", f"hydra.run.dir={run_dir}", timeout=120)
    assert result.returncode == 0, result.describe()
    printed = OmegaConf.create(result.stdout)
    assert printed.recipe.lr == 0.5
    assert printed.recipe.stage == "sft"
    assert not run_dir.exists()
    assert "sft finished" not in result.stdout
    assert "Traceback" not in result.output


# (override, dotted path in the validated RunConfig, expected value)
OVERRIDES = [
    ("recipe.max_steps=7", "recipe.max_steps", 7),
    ("recipe.lr=2e-4", "recipe.lr", 2e-4),
    ("recipe.batch_size=3", "recipe.batch_size", 3),
    ("recipe.grad_accum=4", "recipe.grad_accum", 4),
    ("recipe.max_length=48", "recipe.max_length", 48),
    ("recipe.eval_every=5", "recipe.eval_every", 5),
    ("recipe.save_every=6", "recipe.save_every", 6),
    ("seed=123", "seed", 123),
    ("model.name_or_path=/models/base", "model.name_or_path", "/models/base"),
    ("adapter.r=16", "adapter.r", 16),
    ("adapter.alpha=32", "adapter.alpha", 32.0),
    ("data.path=/data/sft.jsonl", "data.path", "/data/sft.jsonl"),
    ("hardware.device=auto", "hardware.device", "auto"),
]


def lookup(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


@pytest.mark.parametrize("override, path, expected", OVERRIDES, ids=[o for o, _, _ in OVERRIDES])
def test_documented_override_validates(override, path, expected):
    extra = ["adapter=lora"] if override.startswith("adapter.") else []
    run = validation.validate(hydra_app.compose_config([*extra, override]))
    value = lookup(run, path)
    assert value == expected and type(value) is type(expected)


def test_documented_overrides_through_cli(alignctl, tmp_path):
    """All documented overrides at once through the real CLI (--cfg job: nothing trains)."""
    overrides = [o for o, _, _ in OVERRIDES]
    result = alignctl("train", "--cfg", "job", "adapter=lora", *overrides, f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 0, result.describe()
    printed = OmegaConf.create(result.stdout)
    for _, path, expected in OVERRIDES:
        assert OmegaConf.select(printed, path) == expected, path


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_through_cli(alignctl, tmp_path, group, option):
    extras = REQUIRED_EXTRAS.get((group, option), [])
    result = alignctl("train", "--cfg", "job", f"{group}={option}", *extras, timeout=120)
    assert result.returncode == 0, result.describe()
    assert OmegaConf.create(result.stdout)[group] is not None


def test_valid_sweeps_pass_the_check():
    """Every job of a valid -m sweep composes and validates (a range, a list and a glob over a group)."""
    hydra_app.check_jobs(["recipe.lr=0.1,0.2", "recipe.max_steps=range(1,3)", "adapter=glob(*)"], True)
    jobs = hydra_app.expand_sweep(["recipe.lr=0.1,0.2", "seed=1"], True)
    assert sorted(jobs) == [["recipe.lr=0.1", "seed=1"], ["recipe.lr=0.2", "seed=1"]]


def test_cli_module_stays_small():
    """cli/main.py only dispatches; the logic lives in cli/app.py."""
    source = (hydra_app.Path(hydra_app.__file__).parent / "main.py").read_text()
    assert len(source.splitlines()) <= 60
