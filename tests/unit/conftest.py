"""Shared fixtures for the unit tests: a local char tokenizer, a DataConfig builder, an isolated
datasets cache. Nothing here touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # unit tests never reach a hub, even by mistake

import datasets  # noqa: E402
import pytest  # noqa: E402

from alignctl.config import DataConfig, Overlong  # noqa: E402
from alignctl.tokenizer import build_char_tokenizer  # noqa: E402

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
    def make(path, train_split="train", eval_split=None, overlong=Overlong.error) -> DataConfig:
        return DataConfig(
            path=str(path),
            config_name=None,
            train_split=train_split,
            eval_split=eval_split,
            overlong=overlong,
            num_proc=None,
            eval_limit=None,
            eval_task=None,
        )

    return make
