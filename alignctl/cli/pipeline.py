"""`alignctl pipeline NAME|PATH [overrides] [-m]`: run stages in order, each starting from earlier ones.

A pipeline file (recipes/<name>.yaml) lists stages in the order they run::

    stages:
      sft:    {overrides: [recipe=sft]}
      reward: {overrides: [recipe=reward], inputs: {init: sft}}
      ppo:    {overrides: [recipe=ppo], inputs: {policy: sft, reward: reward}}

``inputs`` maps a role of ``inputs.*`` to an earlier stage, whose run directory fills it in.
Command-line overrides apply to every stage (``recipe.max_steps=50``), or to one stage when
prefixed with its name (``ppo.recipe.beta=0.1``); ``pipeline.dir=PATH`` picks where the runs go
(default ``runs/pipelines/<name>``).

Runs are content-addressed: a stage runs in ``<dir>/<stage>-<hash>``, the hash of its whole config,
parents' run directories included, so a parent that changes gives its children new hashes too.
Re-running a pipeline skips every stage whose directory holds a finished run, re-runs a changed
stage and everything downstream of it, and never overwrites a finished run. A stage that failed or
was interrupted after saving a checkpoint resumes from it (``resume=true``). ``<dir>/<stage>`` links
to the stage's latest run. With ``-m`` every combination of the swept values runs as one pipeline,
and the stages the combinations share run once.

Every stage's config is composed and validated before the first one starts: a bad pipeline file
or override fails in one line, before anything trains.
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig

from alignctl.cli import app as hydra_app
from alignctl.core.errors import UserError
from alignctl.runs.interrupt import naming_checkpoint
from alignctl.runs.outputs import check_output
from alignctl.runs.rundir import config_hash, record_overrides
from alignctl.runs.runfiles import read_lineage

# Top-level config keys and groups: an override starting with one of these applies to every stage.
TOP_LEVEL = ("recipe", "model", "adapter", "data", "hardware", "logger", "seed", "inputs")


@dataclass
class Stage:
    name: str
    overrides: list[str]
    inputs: dict[str, str]  # role -> earlier stage name


@dataclass
class Pipeline:
    name: str
    path: Path
    stages: list[Stage]
    description: str = ""


@dataclass
class PlannedStage:
    stage: Stage
    overrides: list[str]  # everything this stage's `alignctl train` would get, inputs included
    cfg: DictConfig
    run_dir: Path
    cached: bool = False
    parents: dict[str, Path] = field(default_factory=dict)


def find_pipeline(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"pipeline {name_or_path}: no such file")
        return path
    known = sorted(p.stem for p in hydra_app.recipes_dir().glob("*.yaml"))
    if name_or_path not in known:
        close = difflib.get_close_matches(name_or_path, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"pipeline {name_or_path!r}: no such pipeline recipe; {hint}valid: {', '.join(known)} (or a path to a .yaml file)")
    return hydra_app.recipes_dir() / f"{name_or_path}.yaml"


def load_pipeline(path: Path) -> Pipeline:
    """Read and check a pipeline file: stage names, their overrides, and inputs naming earlier stages."""
    try:
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); is it a pipeline file?") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(body, dict) or not isinstance(body.get("stages"), dict) or not body["stages"]:
        raise UserError(f"{path}: needs a 'stages:' mapping of stage name -> {{overrides: [...], inputs: {{role: stage}}}}")
    unknown = set(body) - {"stages", "description"}
    if unknown:
        raise UserError(f"{path}: unknown top-level key {sorted(unknown)[0]!r}; valid: stages, description")
    stages: list[Stage] = []
    for name, spec in body["stages"].items():
        where = f"{path}: stage {name!r}"
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"overrides", "inputs"}:
            raise UserError(f"{where}: expected {{overrides: [...], inputs: {{role: stage}}}}, got {spec!r}")
        if "." in str(name) or str(name) in TOP_LEVEL:
            raise UserError(f"{where}: a stage name cannot contain '.' or be one of {', '.join(TOP_LEVEL)}")
        overrides, inputs = spec.get("overrides") or [], spec.get("inputs") or {}
        # A bare string would be read character by character, a list of mappings stringified: refuse both.
        if not isinstance(overrides, list) or not all(isinstance(o, str | int | float | bool) for o in overrides):
            raise UserError(f"{where}: overrides must be a list of key=value strings, got {overrides!r:.80}")
        if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
            raise UserError(f"{where}: inputs must map roles to earlier stage names ({{policy: sft}}), got {inputs!r:.80}")
        overrides = [str(o) for o in overrides]
        earlier = [s.name for s in stages]
        for role, parent in inputs.items():
            if parent == name:
                raise UserError(f"{where}: inputs.{role} names the stage itself (a cycle)")
            if parent not in earlier:
                later = parent in body["stages"]
                reason = "comes later in the file (stages run in order, so this would be a cycle or a wrong order)" if later else "is not a stage of this pipeline"
                raise UserError(f"{where}: inputs.{role}={parent!r} {reason}; earlier stages: {', '.join(earlier) or '(none)'}")
        stages.append(Stage(str(name), overrides, {str(k): str(v) for k, v in inputs.items()}))
    return Pipeline(path.stem, path, stages, str(body.get("description", "")))


def split_overrides(overrides: list[str], stages: list[Stage]) -> tuple[list[str], dict[str, list[str]], Path | None]:
    """(overrides for every stage, overrides per stage name, pipeline.dir or None)."""
    names = [s.name for s in stages]
    common: list[str] = []
    per_stage: dict[str, list[str]] = {name: [] for name in names}
    out_dir = None
    for override in overrides:
        key, _, value = override.partition("=")
        bare = key.lstrip("+~")
        head, _, rest = bare.partition(".")
        if bare == "pipeline.dir":
            out_dir = Path(value).expanduser()
        elif head in per_stage and rest:
            per_stage[head].append(override[: len(key) - len(bare)] + rest + "=" + value)
        elif head in TOP_LEVEL or head.startswith("hydra"):
            common.append(override)
        else:
            valid = names + list(TOP_LEVEL)
            close = difflib.get_close_matches(head, valid, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"{override}: {head!r} is neither a stage of this pipeline nor a config key; {hint}stages: {', '.join(names)}; keys: {', '.join(TOP_LEVEL)}")
    return common, per_stage, out_dir


def plan(pipeline: Pipeline, overrides: list[str], root: Path) -> list[PlannedStage]:
    """Compose and validate every stage's config (exits 2 on the first bad one) and find its run directory."""
    common, per_stage, _ = split_overrides(overrides, pipeline.stages)
    planned: dict[str, PlannedStage] = {}
    for stage in pipeline.stages:
        parents = {role: planned[parent].run_dir.resolve() for role, parent in stage.inputs.items()}
        stage_overrides = [*stage.overrides, *common, *per_stage[stage.name], *(f"inputs.{role}={p}" for role, p in parents.items())]
        # Parents may not exist yet: validation reads only the config.
        (composed,) = hydra_app.check_jobs(stage_overrides, multirun=False, label=f"stage {stage.name}")
        cfg = hydra_app.without_hydra(composed)
        run_dir = root / f"{stage.name}-{config_hash(cfg)[:10]}"
        planned[stage.name] = PlannedStage(stage, stage_overrides, cfg, run_dir, parents=parents)
    return list(planned.values())


def _point_latest(root: Path, name: str, run_dir: Path) -> None:
    link, tmp = root / name, root / f".{name}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def run_stage(planned: PlannedStage, resume: bool = False) -> dict[str, float]:
    """Run one stage as `alignctl train <overrides> hydra.run.dir=<run dir>` would: in this process,
    or, with hardware.nproc > 1, in processes started by torchrun."""
    from omegaconf import OmegaConf

    from alignctl.cli import launch
    from alignctl.cli.ownership import owned
    from alignctl.config.validation import validate

    cfg = planned.cfg
    if resume:  # not part of the config hash: the resumed run is the same run
        cfg = OmegaConf.merge(cfg, {"resume": True})
    run_config = validate(cfg)
    overrides = [*planned.overrides, *(["resume=true"] if resume else [])]
    with owned(run_config, cfg, planned.run_dir), naming_checkpoint(planned.run_dir):  # checked and locked before the first file is written there
        # What Hydra records for a run, so `alignctl eval run=<dir>` and `resume=<dir>` can replay this stage.
        record_overrides(planned.run_dir, [*planned.overrides, f"hydra.run.dir={planned.run_dir}"])
        return launch.run_stage(run_config, cfg, planned.run_dir, overrides, [f"hydra.run.dir={planned.run_dir}"])


def _status(run_dir: Path) -> str | None:
    return read_lineage(run_dir).get("status") if (run_dir / "lineage.json").exists() else None


def run_pipeline(pipeline: Pipeline, stages: list[PlannedStage], root: Path) -> list[PlannedStage]:
    """Run the planned stages in order: skip those finished before, resume those stopped after a save."""
    from alignctl.core.console import console
    from alignctl.train.checkpoint import latest_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    for index, planned in enumerate(stages, start=1):
        title = f"[bold]pipeline {pipeline.name}[/] stage {index}/{len(stages)}: {planned.stage.name} -> {planned.run_dir}"
        status = _status(planned.run_dir)
        if status == "finished":
            planned.cached = True
            console.print(f"{title}  [green](finished before with the same config and parents: skipped)[/]")
        else:
            checkpoint = latest_checkpoint(planned.run_dir) if status is not None else None
            console.rule(title)
            if checkpoint is not None:
                console.print(f"[yellow]{status} before: resuming from {checkpoint.name}[/]")
            started = time.perf_counter()
            run_stage(planned, resume=checkpoint is not None)
            console.print(f"{planned.stage.name}: {time.perf_counter() - started:.0f} s")
        _point_latest(root, planned.stage.name, planned.run_dir)
    return stages


def pipeline_command(args: list[str]) -> None:
    """Entry point of `alignctl pipeline`: parse, plan every job, then run them."""
    from alignctl.cli.report import accuracy_table
    from alignctl.core.console import console

    positional = [a for a in args if "=" not in a and not a.startswith("-")]
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    if len(positional) != 1:
        raise UserError("pipeline needs one pipeline name or file: alignctl pipeline rlhf [overrides] [-m]")
    unknown_flags = [f for f in flags if f not in ("-m", "--multirun")]
    if unknown_flags:
        raise UserError(f"pipeline: unknown flag {unknown_flags[0]}; valid: -m/--multirun")
    pipeline = load_pipeline(find_pipeline(positional[0]))
    _, _, out_dir = split_overrides(overrides, pipeline.stages)
    root = out_dir or Path("runs") / "pipelines" / pipeline.name
    hydra_app.check_writable(root, "pipeline.dir")
    check_output(root, "pipeline.dir")
    jobs = hydra_app.expand_sweep([o for o in overrides if not o.startswith("pipeline.dir=")], multirun=bool(flags))
    # Plan every job first: a bad value in the last combination fails before the first trains.
    plans = [plan(pipeline, job, root) for job in jobs]
    hydra_app.quiet_libraries()
    for number, (job, planned) in enumerate(zip(jobs, plans)):
        if len(jobs) > 1:
            console.rule(f"[bold]sweep job {number + 1}/{len(jobs)}[/]: {' '.join(job)}")
        stages = run_pipeline(pipeline, planned, root)
        console.print(accuracy_table(pipeline.name, [(s.stage.name, s.run_dir, s.cached) for s in stages]))

