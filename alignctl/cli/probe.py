"""`alignctl probe <train overrides> [probe.prompts=N] [--json]`: the sampler/trainer log-prob gap of an
online RL recipe before training (the work: alignctl/rl/probe.py). Writes nothing into runs/."""

from __future__ import annotations

import json

from alignctl.config.schema import OnlineRLConfig
from alignctl.core.errors import ConfigError, UserError

DEFAULT_PROMPTS = 8


def probe_command(args: list[str]) -> None:
    from rich.table import Table

    from alignctl.cli import app as hydra_app
    from alignctl.config.validation import validate
    from alignctl.core.console import console

    as_json, args = hydra_app.json_and_overrides("probe", args, takes=", probe.prompts=N")
    prompts = DEFAULT_PROMPTS
    for arg in [a for a in args if a.startswith("probe.prompts=")]:
        value = arg.split("=", 1)[1]
        if not value.isdigit() or not 1 <= int(value) <= 10_000:
            raise UserError(f"probe.prompts: {value!r} is not a whole number in [1, 10000]")
        prompts = int(value)
    args = [a for a in args if not a.startswith("probe.prompts=")]
    (composed,) = hydra_app.check_jobs(args, multirun=False)
    cfg = validate(composed)
    if not isinstance(cfg.recipe, OnlineRLConfig):  # before torch loads: a config error stays quick
        raise ConfigError("recipe", f"probe measures an online RL recipe's sampler; {cfg.recipe.stage} samples nothing: use recipe=grpo or recipe=ppo")
    hydra_app.quiet_libraries()
    from alignctl.rl.probe import probe

    result = probe(cfg, prompts)
    if as_json:  # for scripts: the figures and nothing else on stdout
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"sampler vs trainer: {result['prompts']} prompts, one completion each")
    for column in ("engine", "autocast", "weights", "tokens", "mean |Δ log p|", "max |Δ log p|", f"over cap {result['cap']:g}"):
        table.add_column(column, justify="left" if column in ("engine", "autocast", "weights") else "right")

    def shown(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    table.add_row(result["engine"], result["autocast"], result["dtype"], str(result["tokens"]), shown(result["logprob_diff"], ".2e"),
                  shown(result["logprob_diff_max"], ".2e"), shown(result["over_cap_frac"], ".1%"))
    console.print(table)
    console.print(f"verdict: {result['verdict']}", markup=False)
