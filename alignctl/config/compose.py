"""Composing alignctl's config through Hydra's public API, and expanding -m sweeps as Hydra's basic
sweeper does, so that `alignctl train` can check every job before Hydra runs one.

It uses Hydra's public API: `hydra.initialize_config_dir` and `hydra.compose` (the Compose API), the
overrides parser (`hydra.core.override_parser`, the API sweeper plugins are written against),
`hydra.searchpath` for a user's --config-dir, and `GlobalHydra.config_loader()` for `glob()` sweeps
over a group. The one thing Hydra has no public function for, the basic sweeper's cartesian product,
is written here as `expand_overrides`; tests/unit/test_hydra_compose.py checks it and the search order
against Hydra's own, so a Hydra release that changes them fails there rather than in a user's sweep.

Nothing here imports torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from alignctl.core.errors import UserError

DEFAULT_CONFIG = "config"
JOB_NAME = "alignctl"
VERSION_BASE = "1.3"  # as cli.py's @hydra.main


def conf_dir() -> Path:
    """conf/ inside an installed wheel (alignctl/conf), else the source tree's top-level conf/."""
    package = Path(__file__).resolve().parents[1]  # alignctl/
    return package / "conf" if (package / "conf" / "config.yaml").exists() else package.parent / "conf"


def recipes_dir() -> Path:
    package = Path(__file__).resolve().parents[1]  # alignctl/
    return package / "recipes" if (package / "recipes").is_dir() else package.parent / "recipes"


def group_options(group: str) -> list[str]:
    """Options a user can pick for a config group (files starting with '_' are shared fragments)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml") if not p.stem.startswith("_"))


def groups() -> list[str]:
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith("_") and list(p.glob("*.yaml")))


@contextmanager
def hydra_session(directory: Path) -> Iterator[None]:
    """Hydra initialised over `directory` for the duration (the global state it had is restored after)."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(directory), version_base=VERSION_BASE, job_name=JOB_NAME):
        yield


def config_dir_overrides(config_dir: str | None, overrides: list[str]) -> list[str]:
    """A user's --config-dir as `hydra.searchpath`: searched after conf/ and before Hydra's structured
    configs, exactly where Hydra's own main puts --config-dir. A command line that sets
    hydra.searchpath itself keeps it, with the directory added at its end."""
    if config_dir is None:
        return overrides
    entry = f"file://{Path(config_dir).expanduser().resolve()}"
    given = [o for o in overrides if o.split("=", 1)[0] == "hydra.searchpath"]
    if not given:
        return [f"hydra.searchpath=[{entry}]", *overrides]
    key, _, value = given[-1].partition("=")
    merged = f"{key}={value.rstrip()[:-1]},{entry}]" if value.strip().startswith("[") and value.strip() != "[]" else f"{key}=[{entry}]"
    return [merged if o is given[-1] else o for o in overrides if o not in given[:-1]]


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The job config for `overrides`, with Hydra's `hydra` node (inside `hydra_session`)."""
    from hydra import compose as hydra_compose

    return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def fixed_overrides(overrides: list[str]) -> list[str]:
    """`overrides` without the sweeps (a,b / range() / choice() / glob()): what every job shares.
    An override that does not parse is kept, so composing it reports it."""
    parser = OverridesParser.create()
    kept = []
    for override in overrides:
        try:
            if parser.parse_override(override).is_sweep_override():
                continue
        except HydraException:
            pass
        kept.append(override)
    return kept


class SweepTypeError(HydraException):
    """A sweep the basic sweeper cannot enumerate (interval(), a continuous range)."""


def expand_overrides(overrides: list[str], with_config_loader: bool = False) -> list[list[str]]:
    """Every job's overrides: the cartesian product of the sweeps, in Hydra's basic-sweeper order.

    A key given twice keeps its last value (its position stays that of its first occurrence), the
    other keys keep their order, and the last key varies fastest. `with_config_loader` lets `glob()`
    sweeps over a config group list the group (inside `hydra_session`)."""
    loader = None
    if with_config_loader:
        from hydra.core.global_hydra import GlobalHydra

        loader = GlobalHydra.instance().config_loader()
    choices: dict[str, list[str]] = {}
    for parsed in OverridesParser.create(config_loader=loader).parse_overrides(overrides):
        key = parsed.get_key_element()
        if not parsed.is_sweep_override():
            choices[key] = [f"{key}={parsed.get_value_element_as_str()}"]
        elif parsed.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in parsed.sweep_string_iterator()]
        else:
            kind = parsed.value_type.name if parsed.value_type is not None else "?"
            raise SweepTypeError(f"the basic sweeper does not support sweep type {kind}")
    return [list(job) for job in itertools.product(*choices.values())]


class Session:
    """Composition inside one Hydra initialisation (`session`)."""

    def __init__(self, config_dir: str | None):
        self.config_dir = config_dir

    def compose(self, config_name: str, overrides: list[str], multirun: bool = False) -> DictConfig:
        """A job's config; with `multirun`, what the jobs of a sweep share (its sweeps left out)."""
        job = fixed_overrides(overrides) if multirun else overrides
        return compose(config_name, config_dir_overrides(self.config_dir, job))


@contextmanager
def session(config_dir: str | None = None) -> Iterator[Session]:
    """A Hydra session over conf/ (plus a user's --config-dir, searched where Hydra's own main puts it)."""
    if config_dir is not None and not Path(config_dir).expanduser().is_dir():
        raise UserError(f"--config-dir {config_dir}: no such directory")
    with hydra_session(conf_dir()):
        yield Session(config_dir)


def compose_config(overrides: list[str], config_name: str = DEFAULT_CONFIG, config_dir: str | None = None) -> DictConfig:
    """The job config `alignctl train <overrides>` would run with (without the `hydra` node)."""
    with session(config_dir) as composer:
        return without_hydra(composer.compose(config_name, overrides))


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The job's own config: `cfg` without Hydra's `hydra` node."""
    with writable(cfg):
        del cfg["hydra"]
    return cfg


@contextmanager
def writable(cfg: DictConfig) -> Iterator[None]:
    from omegaconf import open_dict, read_write

    with read_write(cfg), open_dict(cfg):
        yield


def expand_sweep(overrides: list[str], multirun: bool, composer: Session | None = None, sweep_params: dict | None = None) -> list[list[str]]:
    """Every job's override list: one job, or the cartesian product of a -m sweep.

    As Hydra's basic sweeper: `hydra.sweeper.params` first, then the command line (a key given
    twice keeps its last value); glob() over a group needs a `composer` (inside a session, for its config loader).
    """
    if not multirun:
        return [overrides]
    params = [f"{k}={v}" for k, v in (sweep_params or {}).items()]
    return expand_overrides(params + overrides, with_config_loader=composer is not None)
