"""Security defaults: checkpoints are data (never pickled code), remote model code is opt-in, and user
reward code comes only from an explicit dotted path resolved by import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from alignctl.rl.reward_sources import RewardError, function_sources

PACKAGE = Path(__file__).resolve().parents[2] / "alignctl"
CONF = Path(__file__).resolve().parents[2] / "conf"


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    found.append((path, node))
    return found


def test_every_torch_load_is_weights_only():
    loads = calls("load")
    torch_loads = [(p, c) for p, c in loads if isinstance(c.func, ast.Attribute) and getattr(c.func.value, "id", None) == "torch"]
    assert torch_loads, "expected torch.load calls (trainer state, reference cache)"
    for path, call in torch_loads:
        flags = {k.arg: k.value for k in call.keywords}
        assert "weights_only" in flags and getattr(flags["weights_only"], "value", None) is True, f"{path}:{call.lineno} loads pickles"


def test_no_eval_or_exec_in_the_package():
    builtin = [(p, c) for name in ("eval", "exec") for p, c in calls(name) if isinstance(c.func, ast.Name)]  # not model.eval()
    assert not builtin, [f"{p}:{c.lineno}" for p, c in builtin]


def test_no_model_option_trusts_remote_code_by_default():
    for option in (CONF / "model").glob("*.yaml"):
        assert yaml.safe_load(option.read_text())["trust_remote_code"] is False, option


@pytest.mark.parametrize("entry", ["__import__('os').system('touch /tmp/pwned')", "os.system('x')", "lambda: 1", "print"])
def test_a_reward_function_must_be_a_dotted_path(entry, tmp_path):
    with pytest.raises(RewardError, match="dotted path|cannot import"):
        function_sources([entry], None)
