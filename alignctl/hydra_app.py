"""Hydra plumbing for the CLI: find conf/, check every job's overrides before anything runs, and turn
Hydra's and our validation errors into one line each.

`alignctl train` is a plain `@hydra.main` application, so -m, --cfg job, hydra.run.dir=... and
launcher plugins all behave as Hydra documents. Before handing over to Hydra, each job of the
command (one, or every combination of a -m sweep, expanded as Hydra's basic sweeper does) is
composed and validated, so a typo fails before any model loads and before any sweep job starts.

Nothing here imports torch: a bad command line fails in well under a second.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from alignctl.errors import ConfigError, UserError
from alignctl.outputs import check_output, evaluated_runs
from alignctl.validation import unknown_key_message, validate

SUBCOMMANDS = {
    "train": "train one stage: alignctl train recipe=sft [group=option ...] [key=value ...] [-m]",
    "eval": "evaluate a run's checkpoint, no training: alignctl eval run=<run dir> [key=value ...]",
    "pipeline": "run a pipeline recipe: alignctl pipeline rlhf|dpo|grpo|<file.yaml> [key=value] [stage.key=value] [-m]",
    "runs": "list runs with stage, parents, status and headline metric: alignctl runs [DIR]",
    "report": "plot a pipeline's curves and tabulate accuracy after each stage: alignctl report DIR",
    "plan": "dry run: resolved config, parameters, memory, batch arithmetic: alignctl plan <train overrides>",
    "export": "a run's checkpoint as a plain HF directory: alignctl export run=<run dir> out=<dir> [merge=true]",
}
# Commands that are not Hydra applications: they take their own arguments.
PLAIN_COMMANDS = ("pipeline", "runs", "report", "export", "plan")

# Hydra's own command-line flags; those in TAKES_VALUE consume the next argument.
HYDRA_FLAGS = {"-m", "--multirun", "--cfg", "-c", "--package", "-p", "--info", "-i", "--resolve", "--help", "-h", "--hydra-help", "--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp", "--experimental-rerun", "--shell-completion", "-sc", "--version", "--run", "-r"}
TAKES_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp", "--experimental-rerun", "--shell-completion", "-sc"}
# Flags after which Hydra prints something and runs no job: nothing to check.
NO_JOB_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--version", "--experimental-rerun"}
# Hydra accepts only one of these per command.
EXCLUSIVE_FLAGS = [("-m", "--multirun"), ("--cfg", "-c"), ("--info", "-i"), ("--shell-completion", "-sc"), ("--run", "-r")]
DEFAULT_CONFIG = "config"


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
    print(f"alignctl: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)



def usage() -> str:
    lines = ["usage: alignctl <command> [overrides ...]", "", "commands:"]
    lines += [f"  {name:9s} {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "config groups (pick with group=option):"]
    lines += [f"  {group:9s} {', '.join(group_options(group))}" for group in groups()]
    launchers = sorted(p.stem for p in (conf_dir() / "hydra" / "launcher").glob("*.yaml"))
    lines += [f"  {'launcher':9s} {', '.join(launchers)}  (hydra/launcher=..., for -m sweeps)"]
    pipelines = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    lines += ["", f"pipeline recipes (recipes/): {', '.join(pipelines) or '(none)'}"]
    lines += ["", "any key can be overridden (recipe.lr=1e-4 adapter.r=16); `alignctl train --cfg job` prints the config."]
    return "\n".join(lines)


def quiet_libraries() -> None:
    """alignctl draws its own progress and reports errors itself; the libraries' bars, import chatter
    and error logs (datasets logs a parse error before raising it) would drown it or double it."""
    import logging
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# ------------------------------------------------------------------------------ command line
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


def flag_value(flags: list[str], *names: str) -> str | None:
    """The value of a flag given as `--name value` or `--name=value` (the last one wins), or None."""
    found = None
    for i, flag in enumerate(flags):
        name, eq, value = flag.partition("=")
        if name in names:
            found = value if eq else (flags[i + 1] if i + 1 < len(flags) else None)
    return found


def run_command(args: list[str]) -> tuple[str, list[str]] | None:
    """Check a command line: None when usage was printed, else (command, Hydra's arguments).

    Exits with code 2 and one line on stderr when the command or any job's config is wrong.
    """
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, list(SUBCOMMANDS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        fail(f"unknown command {command!r}; {hint}valid: {', '.join(SUBCOMMANDS)} (see alignctl --help)")
    if command in PLAIN_COMMANDS:
        return command, rest
    if command == "eval":
        from alignctl.evalcmd import eval_args

        try:
            rest = eval_args(rest)
        except UserError as err:
            fail(str(err))
        command = "train"
    else:
        from alignctl.resume import resume_args

        try:
            rest = resume_args(rest)
        except UserError as err:
            fail(str(err))
    flags, overrides, multirun = split_args(rest)
    names = {f.split("=", 1)[0] for f in flags}
    modes = [group[0] for group in EXCLUSIVE_FLAGS if set(group) & names]
    if len(modes) > 1:
        fail(f"{' and '.join(modes)} cannot be combined: use one of {', '.join(g[0] for g in EXCLUSIVE_FLAGS)}")
    if "--resolve" in names and not names & {"--cfg", "-c", "--help", "-h"}:
        fail("--resolve only works together with --cfg (e.g. --cfg job --resolve)")
    if not NO_JOB_FLAGS & {f.split("=", 1)[0] for f in flags}:
        composed = check_jobs(
            overrides,
            multirun,
            config_name=flag_value(flags, "--config-name", "-cn"),
            config_dir=flag_value(flags, "--config-dir", "-cd"),
        )
        if not multirun and not names & {"--cfg", "-c"}:  # a job will run: its directory is claimed before Hydra writes there
            from alignctl.ownership import preflight

            try:
                rest = preflight(composed[0], rest)
            except UserError as err:
                fail(str(err))
    return command, rest


# ------------------------------------------------------------------------------- composition
@contextmanager
def _hydra(config_dir: str | None = None) -> Iterator[Any]:
    """A Hydra instance over conf/ (plus --config-dir, searched first, as Hydra's own main does)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    search_path = create_config_search_path(str(conf_dir()))
    if config_dir is not None:
        extra = Path(config_dir).expanduser().resolve()
        if not extra.is_dir():
            fail(f"--config-dir {config_dir}: no such directory")
        search_path.prepend(provider="command-line", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    backup = get_gh_backup()
    try:
        yield Hydra.create_main_hydra2(task_name="alignctl", config_search_path=search_path)
    finally:
        GlobalHydra.instance().clear()
        restore_gh_from_backup(backup)


def _compose(hydra: Any, config_name: str, overrides: list[str], multirun: bool = False) -> DictConfig:
    from hydra.types import RunMode

    return hydra.compose_config(
        config_name,
        overrides,
        run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN,
        with_log_configuration=False,
        validate_sweep_overrides=not multirun,
    )


def compose_config(overrides: list[str], config_name: str = DEFAULT_CONFIG, config_dir: str | None = None) -> DictConfig:
    """The job config `alignctl train <overrides>` would run with (without the `hydra` node)."""
    with _hydra(config_dir) as hydra:
        return without_hydra(_compose(hydra, config_name, overrides))


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The job's own config: `cfg` without Hydra's `hydra` node."""
    with _writable(cfg):
        del cfg["hydra"]
    return cfg


@contextmanager
def _writable(cfg: DictConfig) -> Iterator[None]:
    from omegaconf import open_dict, read_write

    with read_write(cfg), open_dict(cfg):
        yield


def expand_sweep(overrides: list[str], multirun: bool, hydra: Any = None, sweep_params: dict | None = None) -> list[list[str]]:
    """Every job's override list: one job, or the cartesian product of a -m sweep.

    Mirrors Hydra's basic sweeper: `hydra.sweeper.params` first, then the command line (a key given
    twice keeps its last value); glob() over a group needs `hydra` (for its config loader).
    """
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in (sweep_params or {}).items()]
    loader = hydra.config_loader if hydra is not None else None
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + overrides)
    return BasicSweeper.split_arguments(parsed, None)[0]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _options_in_message(text: str) -> list[str]:
    block = text.split("Available options in", 1)[1] if "Available options in" in text else ""
    block = block.split("Config search path", 1)[0]
    return sorted(line.strip() for line in block.splitlines()[1:] if line.strip() and not line.strip().startswith("_"))


def _suggest(word: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(word, valid, n=1)
    return f"did you mean {close[0]}? " if close else ""


def explain(err: Exception, overrides: list[str], hydra: Any = None, config_name: str = DEFAULT_CONFIG) -> str:
    """One line for a Hydra composition error, naming the culprit and what would be valid."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__

    if isinstance(err, MissingConfigException):
        found = re.search(r"Could not find '(.+)/([^/']*)'", text)
        if found:
            group, option = found.groups()
            valid = _options_in_message(text) or group_options(group)
            if not option:
                return f"{group}=: no {group} option given; valid: {', '.join(valid)}"
            return f"{group}={option}: unknown {group} option; {_suggest(option, valid)}valid: {', '.join(valid)}"
        primary = re.search(r"Cannot find primary config '([^']+)'", text)
        if primary:
            names = sorted(p.stem for p in conf_dir().glob("*.yaml"))
            return f"--config-name {primary.group(1)}: no such config; valid: {', '.join(names)}"

    if isinstance(err, OverrideParseException):
        for override in overrides:
            try:
                OverridesParser.create().parse_overrides([override])
            except HydraException as bad:
                detail = [ln for ln in str(bad).splitlines() if ln.strip() and not ln.startswith(("Error parsing", "See "))]
                reason = detail[0] if detail else "not valid override syntax"
                return f"cannot parse {override!r}: {reason}; overrides look like key=value (quote values with special characters)"
        return f"cannot parse the overrides: {first}"

    ambiguous = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if ambiguous:
        line = ambiguous.group(1)
        key = _key(line)
        return f"{line}: a comma-separated value is a sweep and needs -m; for a list write {key}=[a,b], for a string quote it: {key}='a,b'"

    multiple = re.search(r"Multiple values for (\S+?)\.", text)
    if multiple:
        group = multiple.group(1)
        return f"+{group}=...: {group} already has an option by default; choose one with {group}=<option> (without '+')"

    if "Config group override must be a string or a list" in text:
        for override in overrides:
            if _key(override) in groups():
                value = override.split("=", 1)[1] if "=" in override else ""
                if value not in group_options(_key(override)):
                    group = _key(override)
                    return f"{override}: unknown {group} option; valid: {', '.join(group_options(group))}"

    deleted = re.search(r"Could not delete from config. '([^']+)' does not exist", text)
    bad = re.search(r"Could not override '([^']+)'", text)
    if deleted or bad:
        key = (deleted or bad).group(1)
        prefix = "~" if deleted else ""
        return f"{prefix}{key}: " + _unknown_key(key, overrides, hydra, config_name)
    if isinstance(err, AssertionError) or not text:
        return f"cannot apply the overrides {' '.join(overrides)} ({type(err).__name__}: {first})"
    return first


def _unknown_key(key: str, overrides: list[str], hydra: Any, config_name: str) -> str:
    """Why `key` is not in the config, with the valid keys next to it."""
    parent, _, leaf = key.replace("/", ".").rpartition(".")
    choices = [o for o in overrides if "=" in o and _key(o) in groups() and not o.startswith("~")]
    try:
        with _hydra() if hydra is None else nullcontext(hydra) as h:
            cfg = _compose(h, config_name, choices, multirun=True)
    except Exception:  # noqa: BLE001 - only for a friendlier message; fall back to a plain one
        return "unknown key (see alignctl train --cfg job)"
    if not parent:
        valid = groups() + sorted(str(k) for k in cfg if str(k) not in groups() and k != "hydra")
        return "unknown key or group; " + _suggest(leaf, valid) + f"valid: {', '.join(valid)}"
    node = OmegaConf.select(cfg, parent)
    if not isinstance(node, DictConfig):
        return f"unknown key: {parent} is not a section with keys"
    message = unknown_key_message(f"{parent}.{leaf}", [str(k) for k in node.keys()])
    group = parent.split(".", 1)[0]
    if "." not in parent and group in groups():
        current = cfg.hydra.runtime.choices.get(group) if "hydra" in cfg else None
        elsewhere = [o for o in group_options(group) if o != current and _option_has_key(group, o, leaf)]
        if elsewhere:
            message += f" ({leaf} is a key of {' / '.join(f'{group}={o}' for o in elsewhere)}; pick it first)"
    return message


def _option_has_key(group: str, option: str, key: str) -> bool:
    try:
        node = OmegaConf.load(conf_dir() / group / f"{option}.yaml")
    except Exception:  # noqa: BLE001
        return False
    return isinstance(node, DictConfig) and key in node


def _set_hydra_config(cfg: DictConfig, job_num: int | None) -> None:
    """Let `${hydra:...}` interpolations in the job config resolve while it is validated."""
    from hydra.core.hydra_config import HydraConfig

    try:
        if job_num is not None:  # what Hydra's launcher sets for each job of a sweep
            with _writable(cfg):
                cfg.hydra.job.num = job_num
                cfg.hydra.job.id = str(job_num)
        HydraConfig.instance().set_config(cfg)
    except Exception:  # noqa: BLE001 - without it only ${hydra:...} interpolations cannot resolve
        pass


def check_writable(path: Path, key: str) -> None:
    """A directory the run will create or write into: its nearest existing ancestor must be a
    writable directory (checked up front: Hydra would fail with a traceback after starting the job)."""
    import os

    existing = path.expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"cannot create {path}: {existing} is a file, not a directory; choose another {key}=<directory>")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, f"cannot write to {path}: {existing} is not writable; choose another {key}=<directory>")


SLURM_REQUIRED = ("partition",)


def _check_launcher(cfg: DictConfig, report) -> None:
    """A launcher preset with a required field left empty, or a Slurm launcher away from Slurm: one
    line now, rather than a traceback once the sweep is being submitted."""
    import shutil

    launcher = OmegaConf.select(cfg, "hydra.launcher")
    if not isinstance(launcher, DictConfig):
        return
    choice = OmegaConf.select(cfg, "hydra.runtime.choices", default={}).get("hydra/launcher", "?")
    slurm = "Slurm" in str(launcher.get("_target_", ""))
    # OmegaConf does not let `???` override the plugin's null defaults, so the required keys are listed here.
    missing = sorted(OmegaConf.missing_keys(launcher)) + [k for k in SLURM_REQUIRED if slurm and launcher.get(k) is None]
    if missing:
        report(f"hydra.launcher.{missing[0]}: required by hydra/launcher={choice}; set hydra.launcher.{missing[0]}=<value>")
    if slurm and shutil.which("srun") is None:
        report(f"hydra/launcher={choice} submits to Slurm, and this machine has no srun; run the sweep here with hydra/launcher=local")


def _check_sweep_targets(overrides: list[str]) -> None:
    """Hydra sweeps over job settings only: `-m hydra.run.dir=a,b` would fail after the launch."""
    for override in overrides:
        try:
            parsed = OverridesParser.create().parse_override(override)
        except HydraException:
            continue  # reported with the job's composition
        if parsed.is_sweep_override() and parsed.is_hydra_override():
            fail(f"{override}: Hydra's own settings cannot be swept; sweep job keys (recipe.lr=1e-4,3e-4) instead")


def check_jobs(overrides: list[str], multirun: bool, config_name: str | None = None, config_dir: str | None = None, label: str | None = None) -> list[DictConfig]:
    """Compose and validate every job of the command; exit 2 on the first problem (prefixed with `label`).

    Returns each job's composed config (with its `hydra` node), so a caller need not compose it again."""
    name = config_name or DEFAULT_CONFIG
    def report(message: str) -> NoReturn:  # fail(), naming where the job comes from
        fail(f"{label}: {message}" if label else message)

    with _hydra(config_dir) as hydra:
        try:
            primary = _compose(hydra, name, overrides, multirun=True)
            mode = OmegaConf.select(primary, "hydra.mode")
            multirun = multirun or str(mode).endswith("MULTIRUN")
            basic = str(OmegaConf.select(primary, "hydra.sweeper._target_", default="")).endswith("BasicSweeper")
            params = OmegaConf.select(primary, "hydra.sweeper.params", default=None) if basic else None
            params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else {}
        except Exception as err:  # noqa: BLE001 - every composition failure is a bad command line
            report(explain(err, overrides, hydra, name))
        if multirun:
            _check_sweep_targets(overrides)
            _check_launcher(primary, report)
        try:
            # Another sweeper (optuna, ...) picks its own values: check the fixed overrides only.
            jobs = expand_sweep(overrides, multirun and basic, hydra, params)
        except HydraException as err:
            if "does not support sweep type" in str(err):
                report(f"{' '.join(overrides)}: the basic sweeper only sweeps over a,b,c lists, range() and choice()")
            report(explain(err, overrides, hydra, name) if isinstance(err, OverrideParseException) else str(err).splitlines()[0])
        if multirun and not basic:
            jobs = [[o for o in overrides if not OverridesParser.create().parse_override(o).is_sweep_override()]]
        composed = []
        for num, job in enumerate(jobs):
            try:
                cfg = _compose(hydra, name, job)
                _set_hydra_config(cfg, num if multirun else None)
                run_config = validate(cfg)
                key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
                check_writable(Path(str(OmegaConf.select(cfg, key))), key)
                check_output(Path(str(OmegaConf.select(cfg, key))), key, evaluating=evaluated_runs(run_config))
            except UserError as err:
                report(str(err))
            except Exception as err:  # noqa: BLE001
                report(explain(err, job, hydra, name))
            composed.append(cfg)
    return composed
