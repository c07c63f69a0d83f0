"""scripts/gpu_check.py (make test-gpu) on a machine without a GPU: one line naming why, exit 2."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.integration.conftest import REPO, run_process


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make test-gpu runs the real check")
def test_gpu_check_without_a_gpu_is_one_line():
    result = run_process([sys.executable, str(REPO / "scripts" / "gpu_check.py")], cwd=REPO, timeout=120)
    assert result.returncode == 2, result.describe()
    assert result.stdout == "" and result.stderr_lines() == [
        "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine with one GPU"]
