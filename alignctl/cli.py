"""`alignctl` command line: subcommands dispatch to Hydra applications or small tools."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from alignctl import hydra_app
from alignctl.errors import UserError

SUBCOMMANDS = {"train": "train one stage: alignctl train recipe=sft [group=option ...] [key=value ...] [-m]"}


@hydra.main(config_path=str(hydra_app.conf_dir()), config_name="config", version_base="1.3")
def _train(cfg: DictConfig) -> dict:
    from alignctl.config import validate
    from alignctl.registry import get_stage

    quiet_libraries()

    run_config = validate(cfg)
    try:
        return get_stage(run_config.recipe.stage)(run_config, cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as err:
        hydra_app.fail(str(err))


def quiet_libraries() -> None:
    """alignctl draws its own progress; the libraries' bars and import chatter would drown it."""
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def usage() -> str:
    lines = ["usage: alignctl <command> [overrides ...]", "", "commands:"]
    lines += [f"  {name:9s} {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "config groups (pick with group=option):"]
    lines += [f"  {group:9s} {', '.join(hydra_app.group_options(group))}" for group in hydra_app.groups()]
    pipelines = sorted(p.stem for p in hydra_app.recipes_dir().glob("*.yaml"))
    lines += ["", f"pipeline recipes (recipes/): {', '.join(pipelines) or '(none)'}"]
    lines += ["", "any key can be overridden (recipe.lr=1e-4 adapter.r=16); `alignctl train --cfg job` prints the config."]
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        hydra_app.fail(f"unknown command {command!r}; valid: {', '.join(SUBCOMMANDS)}")
    flags, overrides, multirun = hydra_app.split_args(rest)
    if not {"--help", "-h", "--hydra-help", "--info", "-i"} & set(flags):
        hydra_app.check_jobs(overrides, multirun)
    sys.argv = [f"alignctl {command}", *rest]
    _train()


if __name__ == "__main__":
    main()
