"""`alignctl` command line: subcommands dispatch to Hydra applications (logic lives in hydra_app)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from alignctl import hydra_app
from alignctl.errors import UserError


@hydra.main(config_path=str(hydra_app.conf_dir()), config_name=hydra_app.DEFAULT_CONFIG, version_base="1.3")
def _train(cfg: DictConfig) -> dict:
    from alignctl.registry import get_stage
    from alignctl.validation import validate

    hydra_app.quiet_libraries()
    try:
        run_config = validate(cfg)
        return get_stage(run_config.recipe.stage)(run_config, cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as err:
        hydra_app.fail(str(err))


COMMANDS = {"train": _train}  # eval is train with max_steps=0 (alignctl/evalcmd.py)
PLAIN = {"pipeline": "alignctl.pipeline:pipeline_command", "runs": "alignctl.report:runs_command", "report": "alignctl.report:report_command"}


def main() -> None:
    checked = hydra_app.run_command(sys.argv[1:])
    if checked is None:
        return
    command, rest = checked
    if command in PLAIN:  # not Hydra apps: they take their own arguments
        module, _, function = PLAIN[command].partition(":")
        try:
            getattr(importlib.import_module(module), function)(rest)
        except UserError as err:
            hydra_app.fail(str(err))
        return
    sys.argv = [f"alignctl {command}", *rest]
    COMMANDS[command]()


if __name__ == "__main__":
    main()
