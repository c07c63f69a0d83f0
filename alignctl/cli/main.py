"""`alignctl` command line: subcommands dispatch to Hydra apps (logic: cli/app.py; early ends: cli/exits.py)."""
from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from alignctl.cli import app as hydra_app
from alignctl.cli.exits import reported
from alignctl.core import allocator, bitsandbytes_gate
from alignctl.runs import interrupt


@hydra.main(config_path=str(hydra_app.conf_dir()), config_name=hydra_app.DEFAULT_CONFIG, version_base="1.3")
def _train(cfg: DictConfig) -> dict:
    from alignctl.cli import launch
    from alignctl.cli.ownership import owned
    from alignctl.config.validation import validate

    hydra_app.quiet_libraries()
    with reported():
        run_config, run_dir, given = validate(cfg), Path(HydraConfig.get().runtime.output_dir), HydraConfig.get().overrides
        # owned: checks and locks the directory (claimed before Hydra, unless a sweep's job)
        with owned(run_config, cfg, run_dir), interrupt.naming_checkpoint(run_dir):
            return launch.run_stage(run_config, cfg, run_dir, list(given.task), list(given.hydra))


COMMANDS = {"train": _train}  # eval is train with max_steps=0 (alignctl/runs/evaluation.py); the others: app.PLAIN


def main() -> None:
    allocator.reexec_under_allocator()  # jemalloc where installed (alignctl/core/allocator.py); returns if nothing to do
    interrupt.answer_ctrl_c()  # after the re-exec: exec keeps an inherited "ignored"
    bitsandbytes_gate.hold_back()  # until a run quantises (models.four_bit_config)
    args, checked = sys.argv[1:], hydra_app.run_command(sys.argv[1:])
    if checked is None:
        return
    command, rest = checked
    try:
        if command in hydra_app.PLAIN:
            # A pipeline stopped by a signal resumes its stage when the same command runs again.
            with reported(resume_hint=" ".join(shlex.quote(a) for a in ["alignctl", *args])):
                getattr(importlib.import_module(hydra_app.PLAIN[command]), f"{command}_command")(rest)
            return
        sys.argv = [f"alignctl {command}", *rest]
        COMMANDS[command]()
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handlers
        print("alignctl: interrupted by SIGINT before training started; nothing to resume", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        hydra_app.print_json_reports()  # eval --json, when its evaluation finished


if __name__ == "__main__":
    main()
