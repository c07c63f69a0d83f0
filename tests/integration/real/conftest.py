"""The real-model tier: SmolLM2-135M-Instruct (model=smollm2), built once per test session.

Everything under this folder carries the `real` marker. The tests that take more than a few seconds
of training also carry `slow` (make test-slow); the rest run in `make test`."""

from __future__ import annotations

from pathlib import Path

import pytest

SMOLLM2_YAML = Path(__file__).resolve().parents[3] / "conf" / "model" / "smollm2.yaml"


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def smollm2_dir(offline_env) -> Path:
    """The Hugging Face directory of model=smollm2, in the session's ALIGNCTL_CACHE (so the CLI runs of
    this session find it built)."""
    pytest.importorskip("gguf", reason="the real tier needs the 'real' extra (make install provides it)")
    from omegaconf import OmegaConf

    from alignctl.models.gguf import build_from_gguf

    spec = OmegaConf.load(SMOLLM2_YAML)
    return build_from_gguf(spec.gguf_file, spec.gguf_package)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) in float32, eval mode; shared, so tests must not train it in place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)
