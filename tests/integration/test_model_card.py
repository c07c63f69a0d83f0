"""Model cards and the hub: every checkpoint and export carries a README.md built from lineage.json
(hub metadata on top; hyperparameters, data fingerprint, final metrics, the chain of parent runs and
the command that reproduces it below), and `export push_to_hub=<repo id>` sends exactly the export's
files through huggingface_hub (its client is replaced here by one that records the calls: no network).

Two real runs on the tiny model: a LoRA SFT run (2 steps) and a DPO run from it (2 steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import run_cli


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cards")
    sft_args = ["recipe=sft", "adapter=lora", "recipe.max_steps=2", "recipe.eval_every=0", "data.eval_limit=8"]
    sft = run_cli(["train", *sft_args, f"hydra.run.dir={root / 'sft'}"], cwd=root)
    assert sft.returncode == 0, sft.describe()
    dpo_args = ["recipe=dpo", "adapter=lora", "recipe.max_steps=2", "recipe.eval_every=0", "data.eval_limit=8", f"inputs.policy={root / 'sft'}"]
    dpo = run_cli(["train", *dpo_args, f"hydra.run.dir={root / 'dpo'}"], cwd=root)
    assert dpo.returncode == 0, dpo.describe()
    return {"root": root, "sft": root / "sft", "dpo": root / "dpo", "dpo_args": dpo_args}


def test_the_checkpoint_card_matches_lineage(chain):
    run = chain["dpo"]
    lineage = json.loads((run / "lineage.json").read_text())
    meta, body = _card(run / "checkpoint")
    assert meta == {"library_name": "peft", "pipeline_tag": "text-generation", "tags": ["alignctl", "dpo", "lora"]}
    assert f"fingerprint: `{lineage['data_fingerprint']}`" in body
    for key, value in lineage["final_metrics"].items():  # every final metric, as the card rounds it
        assert f"| {key} | {value:.4g} |" in body if isinstance(value, float) else f"| {key} | {value} |" in body
    assert f"| `{run}` | dpo | this run |" in body
    assert f"| `{chain['sft']}` | sft | inputs.policy |" in body  # the chain of parents
    assert "alignctl train " + " ".join(chain["dpo_args"]) in body  # the command that trains it again
    assert "| `recipe.beta` | 0.1 |" in body and "| `adapter.r` | 8 |" in body
    # The card replaced peft's stub, and plain peft still loads the adapter next to it.
    assert "Model Card for Model ID" not in body
    assert json.loads((run / "checkpoint" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_every_step_checkpoint_has_a_card(chain):
    steps = sorted((chain["sft"] / "checkpoints").glob("step-*"))
    assert steps and all((step / "README.md").exists() for step in steps)


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records create_repo and what upload_folder would send."""

    calls: list[tuple[str, dict]] = []
    sent: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        RecordingHub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        RecordingHub.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        RecordingHub.sent = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    RecordingHub.calls, RecordingHub.sent = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    return RecordingHub


def test_export_merged_and_pushed_sends_the_card_and_the_weights(chain, hub, tmp_path):
    out = tmp_path / "export"
    done = run_cli(["export", f"run={chain['dpo']}", f"out={out}", "merge=true", "push_to_hub=me/tiny-dpo", "private=true"], cwd=tmp_path)
    assert done.returncode == 0, done.describe()
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": "me/tiny-dpo", "private": True, "exist_ok": True}
    assert set(hub.sent) == {p.name for p in out.iterdir()}  # exactly the export's files
    assert {"README.md", "model.safetensors", "config.json", "alignctl_export.json", "tokenizer_config.json"} <= set(hub.sent)
    assert "trainer_state.pt" not in hub.sent
    meta, body = _card(out)
    assert meta["library_name"] == "transformers" and "(exported, adapter merged)" in body  # a merged model is a plain transformers model
    assert json.loads(hub.sent["alignctl_export.json"])["merge"] is True
    assert "https://huggingface.co/me/tiny-dpo/commit/abc" in done.output


class OfflineHub:
    """huggingface_hub's client as it answers offline (HF_HUB_OFFLINE=1, read by huggingface_hub when first
    imported, which may be before this suite sets it): it refuses to reach the hub."""

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub.errors import OfflineModeIsEnabled

        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.")


def test_a_failed_upload_is_one_line_and_keeps_the_export(chain, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineHub)
    out = tmp_path / "export"
    done = run_cli(["export", f"run={chain['sft']}", f"out={out}", "push_to_hub=me/tiny-sft"], cwd=tmp_path)
    assert done.returncode == 2, done.describe()
    assert "push_to_hub=me/tiny-sft: the upload failed (Cannot reach https://huggingface.co/api/repos/create: offline mode" in done.output
    assert "Traceback" not in done.output and len(done.stderr_lines()) == 1, done.describe()
    assert (out / "README.md").exists() and (out / "adapter_model.safetensors").exists()


class UnreachableHub:
    """No network: httpx's ConnectError, which is not an OSError."""

    def create_repo(self, repo_id, **kwargs):
        class ConnectError(Exception):
            pass

        raise ConnectError("[Errno -2] Name or service not known")


def test_no_network_is_one_line_too(chain, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", UnreachableHub)
    done = run_cli(["export", f"run={chain['sft']}", f"out={tmp_path / 'export'}", "push_to_hub=me/tiny-sft"], cwd=tmp_path)
    assert done.returncode == 2 and "the upload failed ([Errno -2] Name or service not known)" in done.output, done.describe()
    assert (tmp_path / "export" / "README.md").exists()


def test_a_bad_repo_id_writes_nothing(chain, tmp_path):
    out = tmp_path / "export"
    done = run_cli(["export", f"run={chain['sft']}", f"out={out}", "push_to_hub=not a repo"], cwd=tmp_path)
    assert done.returncode == 2 and "is not a hub repository id" in done.output, done.describe()
    assert not out.exists()
