"""One line for a Hydra composition error: the culprit and what would be valid.

Hydra reports composition problems as exceptions whose text names the group, option or key; the
patterns below read those texts (Hydra's messages, stable across 1.3.x and checked by
tests/integration/test_cli_errors.py) and answer with alignctl's own line, with the valid options or
keys next to the culprit.
"""

from __future__ import annotations

import difflib
import re
from contextlib import nullcontext

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from alignctl.config.compose import DEFAULT_CONFIG, Session, conf_dir, group_options, groups, session
from alignctl.config.validation import unknown_key_message


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _options_in_message(text: str) -> list[str]:
    block = text.split("Available options in", 1)[1] if "Available options in" in text else ""
    block = block.split("Config search path", 1)[0]
    return sorted(line.strip() for line in block.splitlines()[1:] if line.strip() and not line.strip().startswith("_"))


def _suggest(word: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(word, valid, n=1)
    return f"did you mean {close[0]}? " if close else ""


def explain(err: Exception, overrides: list[str], composer: Session | None = None, config_name: str = DEFAULT_CONFIG) -> str:
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
        return f"{prefix}{key}: " + _unknown_key(key, overrides, composer, config_name)
    if isinstance(err, AssertionError) or not text:
        return f"cannot apply the overrides {' '.join(overrides)} ({type(err).__name__}: {first})"
    return first


def _unknown_key(key: str, overrides: list[str], composer: Session | None, config_name: str) -> str:
    """Why `key` is not in the config, with the valid keys next to it."""
    parent, _, leaf = key.replace("/", ".").rpartition(".")
    choices = [o for o in overrides if "=" in o and _key(o) in groups() and not o.startswith("~")]
    try:
        with session() if composer is None else nullcontext(composer) as composer:
            cfg = composer.compose(config_name, choices, multirun=True)
    except Exception:  # noqa: BLE001 - only for a friendlier message; fall back to a plain one
        return "unknown key (see alignctl train --cfg job)"
    if not parent:
        valid = groups() + sorted(str(k) for k in cfg if str(k) not in groups() and k != "hydra")
        return "unknown key or group; " + _suggest(leaf, valid) + f"valid: {', '.join(valid)}"
    existing = OmegaConf.select(cfg, key.replace("/", "."), default=None)
    given = next((o.split("=", 1)[1] for o in overrides if "=" in o and _key(o) == key), None)
    if isinstance(existing, DictConfig) and given is not None and given.lstrip().startswith("{"):
        # Hydra merges a mapping into a mapping, and the new keys are refused without '+'.
        return f"a mapping's new keys need '+': write +{key}={given} (or +{key}.<name>=<value> for one key)"
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
