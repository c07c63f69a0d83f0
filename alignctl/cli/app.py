"""The CLI's front door: parse the command, check every job's overrides before anything runs, and
turn Hydra's and our validation errors into one line each (composition through Hydra's public API in
alignctl/config/compose.py, Hydra's error texts read in alignctl/config/hydra_errors.py).

`alignctl train` is a plain `@hydra.main` application, so -m, --cfg job, hydra.run.dir=... and
launcher plugins all behave as Hydra documents. Before handing over to Hydra, each job of the
command (one, or every combination of a -m sweep, expanded as Hydra's basic sweeper does) is
composed and validated, so a typo fails before any model loads and before any sweep job starts.

Nothing here imports torch: a bad command line fails in well under a second.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from alignctl.config import compose as hydra_compose
from alignctl.config.compose import (  # noqa: F401 - the CLI's names for them
    DEFAULT_CONFIG,
    compose_config,
    conf_dir,
    expand_sweep,
    group_options,
    groups,
    recipes_dir,
    without_hydra,
)
from alignctl.config.hydra_errors import explain
from alignctl.config.validation import validate
from alignctl.core.console import console
from alignctl.core.errors import ConfigError, UserError
from alignctl.runs.outputs import check_output, evaluated_runs
from alignctl.runs.runfiles import read_json

SUBCOMMANDS = {
    "train": "train one stage: alignctl train recipe=sft [group=option ...] [key=value ...] [-m]",
    "eval": "evaluate a run's checkpoint, no training: alignctl eval run=<run dir> [key=value ...] [--json]",
    "pipeline": "run a pipeline recipe: alignctl pipeline rlhf|dpo|grpo|<file.yaml> [key=value] [stage.key=value] [-m]",
    "runs": "list runs with stage, parents, status and headline metric: alignctl runs [DIR]",
    "report": "plot a pipeline's curves and tabulate accuracy after each stage: alignctl report DIR",
    "plan": "dry run: resolved config, parameters, memory, batch arithmetic: alignctl plan <train overrides> [--json]; --fit 80GiB: "
            "the largest per-device batch, checkpointing, adapter that fit that memory per device",
    "probe": "the rollout engine's log-probs against the trainer's, before training: alignctl probe <train overrides> [--json]",
    "export": "a run's checkpoint as a plain HF directory: alignctl export run=<run dir> out=<dir> [merge=true]",
    "chat": "talk to a run's model (chat template, streaming, /reset): alignctl chat run=<run dir> [system=...] [temperature=0]",
    "data": "rows as the model sees them, trained tokens marked: alignctl data inspect recipe=<r> [data=...] [model=...] [rows=3]",
    "generate": "batch completions to JSON lines: alignctl generate run=<run dir> data=<file.jsonl> out=<file.jsonl> [n=1]",
}
# Commands that are not Hydra applications (they take their own arguments): command -> the module
# whose `<command>_command(args)` runs it.
PLAIN = {
    "pipeline": "alignctl.cli.pipeline",
    "runs": "alignctl.cli.report",
    "report": "alignctl.cli.report",
    "export": "alignctl.cli.export",
    "plan": "alignctl.cli.plan",
    "chat": "alignctl.cli.chat",
    "generate": "alignctl.cli.chat",
    "data": "alignctl.cli.inspect",
    "probe": "alignctl.cli.probe",
}
PLAIN_COMMANDS = tuple(PLAIN)

# Hydra's own command-line flags; those in TAKES_VALUE consume the next argument.
HYDRA_FLAGS = {"-m", "--multirun", "--cfg", "-c", "--package", "-p", "--info", "-i", "--resolve", "--help", "-h", "--hydra-help", "--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp", "--experimental-rerun", "--shell-completion", "-sc", "--version", "--run", "-r"}
TAKES_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp", "--experimental-rerun", "--shell-completion", "-sc"}
# Flags after which Hydra prints something and runs no job: nothing to check.
NO_JOB_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--version", "--experimental-rerun"}
# Hydra accepts only one of these per command.
EXCLUSIVE_FLAGS = [("-m", "--multirun"), ("--cfg", "-c"), ("--info", "-i"), ("--shell-completion", "-sc"), ("--run", "-r")]


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


# `alignctl eval ... --json`: the evaluation directories whose eval.json is printed once the run ends.
JSON_REPORTS: list[Path] = []


def print_json_reports() -> None:
    """One JSON object per evaluation (`--json`): its directory, the run it evaluated and eval.json's metrics."""
    for folder in JSON_REPORTS:
        if (folder / "eval.json").exists():  # else the evaluation failed and said why
            print(json.dumps({"eval_dir": str(folder), "run": str(folder.parent.parent), **read_json(folder / "eval.json")}), flush=True)
    if JSON_REPORTS:
        console.file = None  # back to stdout (the test runner calls main() again in this process)
    JSON_REPORTS.clear()


def json_and_overrides(command: str, args: list[str], takes: str = "") -> tuple[bool, list[str]]:
    """For a command that takes alignctl train's overrides (plan, probe): whether --json was given, and
    the other arguments; any other flag is refused in one line."""
    rest = [a for a in args if a != "--json"]
    if flags := [a for a in rest if a.startswith("-")]:
        raise UserError(f"{command}: unknown flag {flags[0]}; {command} takes the overrides of alignctl train (key=value ...){takes} and --json")
    return len(rest) < len(args), rest


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
        try:
            print(usage(), flush=True)
        except BrokenPipeError:  # `alignctl --help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return None
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, list(SUBCOMMANDS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        fail(f"unknown command {command!r}; {hint}valid: {', '.join(SUBCOMMANDS)} (see alignctl --help)")
    if command in PLAIN_COMMANDS:
        return command, rest
    if command == "eval":
        from alignctl.runs.evaluation import eval_args

        as_json = "--json" in rest
        try:
            rest = eval_args([a for a in rest if a != "--json"])
        except UserError as err:
            fail(str(err))
        if as_json:  # stdout carries the JSON alone; tables and progress go to stderr
            console.file = sys.stderr
            JSON_REPORTS.append(Path(next(a for a in rest if a.startswith("hydra.run.dir=")).split("=", 1)[1]))
        command = "train"
    else:
        from alignctl.runs.resume import resume_args

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
            from alignctl.cli.ownership import preflight

            try:
                rest = preflight(composed[0], rest)
            except UserError as err:
                fail(str(err))
    return command, rest


def _set_hydra_config(cfg: DictConfig, job_num: int | None) -> None:
    """Let `${hydra:...}` interpolations in the job config resolve while it is validated."""
    from hydra.core.hydra_config import HydraConfig

    try:
        if job_num is not None:  # what Hydra's launcher sets for each job of a sweep
            with hydra_compose.writable(cfg):
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

    if config_dir is not None and not Path(config_dir).expanduser().is_dir():
        fail(f"--config-dir {config_dir}: no such directory")
    with hydra_compose.session(config_dir) as session:
        try:
            primary = session.compose(name, overrides, multirun=True)
            mode = OmegaConf.select(primary, "hydra.mode")
            multirun = multirun or str(mode).endswith("MULTIRUN")
            basic = str(OmegaConf.select(primary, "hydra.sweeper._target_", default="")).endswith("BasicSweeper")
            params = OmegaConf.select(primary, "hydra.sweeper.params", default=None) if basic else None
            params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else {}
        except Exception as err:  # noqa: BLE001 - every composition failure is a bad command line
            report(explain(err, overrides, session, name))
        if multirun:
            _check_sweep_targets(overrides)
            _check_launcher(primary, report)
        try:
            # Another sweeper (optuna, ...) picks its own values: check the fixed overrides only.
            jobs = expand_sweep(overrides, multirun and basic, session, params)
        except hydra_compose.SweepTypeError:
            report(f"{' '.join(overrides)}: the basic sweeper only sweeps over a,b,c lists, range() and choice()")
        except HydraException as err:
            report(explain(err, overrides, session, name) if isinstance(err, OverrideParseException) else str(err).splitlines()[0])
        if multirun and not basic:
            jobs = [hydra_compose.fixed_overrides(overrides)]
        composed = []
        for num, job in enumerate(jobs):
            try:
                cfg = session.compose(name, job)
                _set_hydra_config(cfg, num if multirun else None)
                run_config = validate(cfg)
                key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
                check_writable(Path(str(OmegaConf.select(cfg, key))), key)
                check_output(Path(str(OmegaConf.select(cfg, key))), key, evaluating=evaluated_runs(run_config))
            except UserError as err:
                report(str(err))
            except Exception as err:  # noqa: BLE001
                report(explain(err, job, session, name))
            composed.append(cfg)
    return composed
