"""Shared fixtures for the unit tests: a local char tokenizer, a DataConfig builder, an isolated
datasets cache. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # unit tests never reach a hub, even by mistake

import datasets  # noqa: E402
import pytest  # noqa: E402

from alignctl.config.schema import DataConfig, Overlong  # noqa: E402
from alignctl.models.tokenizer import build_char_tokenizer  # noqa: E402

datasets.disable_progress_bars()


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    """Keep the arrow caches that load_dataset/from_json write out of the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


@pytest.fixture
def tok():
    """A fresh char tokenizer (cheap to build; tests may change its chat template)."""
    return build_char_tokenizer()


@pytest.fixture
def data_config():
    def make(path, train_split="train", eval_split=None, overlong=Overlong.error, system_prompt=None) -> DataConfig:
        return DataConfig(
            path=str(path),
            config_name=None,
            train_split=train_split,
            eval_split=eval_split,
            overlong=overlong,
            num_proc=None,
            eval_limit=None,
            eval_task=None,
            system_prompt=system_prompt,
        )

    return make


TINY_YAML = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The default tiny model (conf/model/tiny.yaml), written to a cache of this session's own."""
    from omegaconf import OmegaConf

    from alignctl.config.schema import TinyModelConfig
    from alignctl.models.loading import build_tiny

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALIGNCTL_CACHE", str(tmp_path_factory.mktemp("alignctl_cache")))
        tiny = OmegaConf.to_container(OmegaConf.load(TINY_YAML).tiny)
        path = build_tiny(TinyModelConfig(**tiny))
        assert str(path).startswith(str(tmp_path_factory.getbasetemp()))
        yield path


@pytest.fixture
def module_from_source(tmp_path, monkeypatch):
    """Write `source` as an importable module `name` (user code, e.g. reward functions named by dotted
    path); it is forgotten again after the test."""
    import sys
    import textwrap

    written: list[str] = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        sys.modules.pop(name, None)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)

