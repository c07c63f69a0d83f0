"""Checkpoints read with pread (alignctl/models/pread_loading.py): the same weights as transformers' mmap
read, every host read goes through safetensors' pread backend while alignctl loads, and transformers'
own reader is back afterwards, after an error too."""

from __future__ import annotations

import pytest
import torch
import transformers.modeling_utils as modeling_utils
from transformers import AutoModelForCausalLM

from alignctl.cli.app import compose_config
from alignctl.config.validation import validate
from alignctl.models import pread_loading
from alignctl.models.loading import load_causal_lm


@pytest.fixture
def backends(monkeypatch):
    """The backend of every safe_open transformers makes (through alignctl's wrapper or not)."""
    seen: list[str | None] = []
    real = pread_loading._mapped_open

    def spy(file, framework, device="cpu", backend=None, **kwargs):
        seen.append(backend)
        return real(file, framework=framework, device=device, **({"backend": backend} if backend else {}), **kwargs)

    monkeypatch.setattr(pread_loading, "_mapped_open", spy)
    monkeypatch.setattr(modeling_utils, "safe_open", spy)
    return seen


def test_a_model_loads_through_pread_with_the_same_weights_and_the_reader_is_restored(tiny_dir, backends):
    cfg = validate(compose_config(["model=hf", f"model.name_or_path={tiny_dir}"]))
    ours = load_causal_lm(str(tiny_dir), cfg.model, cfg.hardware)
    assert backends and set(backends) == {"pread"}
    assert modeling_utils.safe_open is pread_loading._mapped_open  # transformers' reader is back
    backends.clear()
    mapped = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    assert backends and "pread" not in backends  # outside alignctl's loaders, transformers reads as it does
    theirs = mapped.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def test_the_reader_is_restored_after_a_failed_load_and_nested_loaders_keep_it_until_the_outermost(backends):
    @pread_loading.reads_not_mapped
    def inner():
        assert modeling_utils.safe_open is pread_loading._pread_open
        raise OSError("no such checkpoint")

    @pread_loading.reads_not_mapped
    def outer():
        with pytest.raises(OSError):
            inner()
        assert modeling_utils.safe_open is pread_loading._pread_open  # still inside the outer loader

    outer()
    assert modeling_utils.safe_open is pread_loading._mapped_open
