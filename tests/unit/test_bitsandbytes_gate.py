"""bitsandbytes stays out of a process until a run quantises (alignctl/core/bitsandbytes_gate.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")

# In a fresh interpreter: this test process may already have imported bitsandbytes through peft.
SCRIPT = """
import importlib.util, sys
from alignctl.core import bitsandbytes_gate as gate
gate.hold_back()
import peft
from peft.import_utils import is_bnb_4bit_available
from transformers.utils.import_utils import is_bitsandbytes_available
assert sys.modules["bitsandbytes"] is None, "peft imported bitsandbytes although it was held back"
assert not is_bnb_4bit_available() and not is_bitsandbytes_available()
gate.release()
assert importlib.util.find_spec("bitsandbytes") is not None
assert is_bnb_4bit_available() and is_bitsandbytes_available(), "cached answers must be asked again"
assert sys.modules["peft.helpers"].bnb is not None
print("ok")
"""


def test_held_back_until_released_then_seen_by_peft_and_transformers():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "kernels-community" not in done.stderr and "publisher trust" not in done.stderr, done.stderr
