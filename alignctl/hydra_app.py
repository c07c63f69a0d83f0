"""Hydra plumbing for the CLI: find conf/, check every job's overrides before anything runs, and turn
Hydra's and our validation errors into one line each.

`alignctl train` is a plain `@hydra.main` application, so -m, --cfg job, hydra.run.dir=... and
launcher plugins all behave as Hydra documents. Before handing over to Hydra, each job of the
command (one, or every combination of a -m sweep) is composed and validated, so a typo fails
before any model loads and before any sweep job starts.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from alignctl.config import validate
from alignctl.errors import ConfigError

# Hydra's own command-line flags; those in TAKES_VALUE consume the next argument.
HYDRA_FLAGS = {"-m", "--multirun", "--cfg", "-c", "--package", "-p", "--info", "-i", "--resolve", "--help", "-h", "--hydra-help", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc", "--version"}
TAKES_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}


def conf_dir() -> Path:
    """conf/ inside an installed wheel (alignctl/conf), else the source tree's top-level conf/."""
    package = Path(__file__).resolve().parent
    return package / "conf" if (package / "conf" / "config.yaml").exists() else package.parent / "conf"


def recipes_dir() -> Path:
    package = Path(__file__).resolve().parent
    return package / "recipes" if (package / "recipes").is_dir() else package.parent / "recipes"


def group_options(group: str) -> list[str]:
    """Options a user can pick for a config group (files starting with '_' are shared fragments)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml") if not p.stem.startswith("_"))


def groups() -> list[str]:
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith("_") and list(p.glob("*.yaml")))


def fail(message: str) -> NoReturn:
    """Print one line and exit with code 2 (bad input), without a traceback."""
    print(f"alignctl: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def split_args(args: list[str]) -> tuple[list[str], list[str], bool]:
    """Separate Hydra flags from overrides; also say whether this is a multirun."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg in HYDRA_FLAGS or arg.split("=", 1)[0] in HYDRA_FLAGS:
            flags.append(arg)
            if arg in TAKES_VALUE and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides, bool({"-m", "--multirun"} & set(flags))


def expand_sweep(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every job's override list: one job, or the cartesian product of a -m sweep."""
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs: list[list[str]] = [[]]
    for override in parsed:
        if override.is_sweep_override():
            values = [f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]
        else:
            values = [override.input_line]
        jobs = [job + [value] for job in jobs for value in values]
    return jobs


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=False)


def explain(err: Exception, overrides: list[str]) -> str:
    """One line for a Hydra composition error, naming the culprit and what would be valid."""
    text = str(err)
    if isinstance(err, MissingConfigException):
        found = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
        if found:
            group, option = found.groups()
            return f"{group}={option}: unknown {group} option; valid: {', '.join(group_options(group))}"
    bad = re.search(r"Could not override '([^']+)'", text)
    if bad:
        key = bad.group(1)
        parent, _, leaf = key.rpartition(".")
        if not parent:
            valid = groups() + sorted(k for k in compose_config([]).keys() if k not in groups())
            return f"{key}: unknown key or group; valid: {', '.join(valid)}"
        try:
            group_choices = [o for o in overrides if "=" in o and o.split("=", 1)[0] in groups()]
            node = OmegaConf.select(compose_config(group_choices), parent)
            valid = ", ".join(str(k) for k in node.keys()) if isinstance(node, DictConfig) else "(none)"
        except (HydraException, ConfigError):
            valid = "(see alignctl train --cfg job)"
        return f"{key}: unknown key; valid keys under {parent}: {valid}"
    return text.strip().splitlines()[0]


def check_jobs(overrides: list[str], multirun: bool) -> None:
    """Compose and validate every job of the command; exit 2 on the first problem."""
    try:
        jobs = expand_sweep(overrides, multirun)
    except HydraException as err:
        fail(f"cannot parse the overrides: {str(err).strip().splitlines()[0]}")
    for job in jobs:
        try:
            validate(compose_config(job))
        except ConfigError as err:
            fail(str(err))
        except HydraException as err:
            fail(explain(err, job))
