"""alignctl/train/trackers.py with made-up metrics records: TRL's metric names, the config and the
run's record files in each tracker's local store, a resume continuing the same tracker run, and the
config check that names a missing tracker's extra. Offline: W&B offline, MLflow's file store,
trackio's local database, all under tmp_path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import tracker_stores as stores
from omegaconf import OmegaConf

from alignctl.config.compose import compose_config
from alignctl.config.schema import LoggerConfig, MLflowConfig, TrackioConfig, WandbConfig
from alignctl.config.validation import validate
from alignctl.core.errors import ConfigError, UserError
from alignctl.runs.rundir import RunDir
from alignctl.train import trackers as trackers_module
from alignctl.train.trackers import IDS_FILE, Trackers, flat_params, mlflow_names, start_trackers, trl_names

MISSING = [name for name in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(name) is None]
# Each tracker on its own: one that is not installed is skipped, naming its extra.
EACH = [pytest.param(name, marks=pytest.mark.skipif(name in MISSING, reason=f"{name} is not installed: pip install 'alignctl[{name}]' (in the dev extra)"))
        for name in ("wandb", "mlflow", "trackio")]

# Two steps of a made-up run as the loop writes them: the untrained model's evaluation, train lines, an evaluation.
RECORDS = [
    {"step": 0, "eval_loss": 2.5, "eval_accuracy": 0.0},
    {"step": 1, "loss": 2.0, "learning_rate": 1e-3, "grad_norm": 3.0, "objective/kl": 0.25, "num_tokens": 40},
    {"step": 2, "loss": 1.5, "learning_rate": 5e-4, "grad_norm": float("nan"), "objective/kl": 0.5, "num_tokens": 80},
    {"step": 2, "eval_loss": 1.25, "eval_accuracy": 0.5},
]


def test_names_are_trl_s():
    assert trl_names({"loss": 1.0, "eval_loss": 2.0, "objective/kl": 3.0, "test_accuracy": 4.0}) == {
        "train/loss": 1.0, "eval/loss": 2.0, "train/objective/kl": 3.0, "test/accuracy": 4.0}
    # MLflow gets the names as logged, with the characters it refuses replaced (as transformers' MLflowCallback does)
    assert mlflow_names({"loss": 1.0, "rewards/margins": 2.0, "kl(k3)": 3.0}) == {"loss": 1.0, "rewards/margins": 2.0, "kl_k3_": 3.0}


def test_the_config_flattens_to_params():
    assert flat_params({"recipe": {"lr": 1e-3, "stage": "sft", "betas": [0.9, 0.99]}, "seed": 0, "inputs": {}}) == {
        "recipe.lr": "0.001", "recipe.stage": "sft", "recipe.betas": "[0.9, 0.99]", "seed": "0", "inputs": "{}"}


def logger_config(project: str, names: list[str], tags: list[str] | None = None) -> LoggerConfig:
    return LoggerConfig(
        tensorboard=False, log_every=1, samples_every=0, project=project, run_name=None, tags=tags or [],
        wandb=WandbConfig(entity=None, mode=None) if "wandb" in names else None,
        mlflow=MLflowConfig(tracking_uri=None) if "mlflow" in names else None,
        trackio=TrackioConfig(space_id=None) if "trackio" in names else None,
    )


def make_run(path, resumed_from=None, enabled=True, lr=1e-3) -> RunDir:
    cfg = OmegaConf.create({"recipe": {"stage": "sft", "lr": lr}, "seed": 0, "logger": {"project": "p"}})
    return RunDir(path, cfg, "sft", {}, data_fingerprint="abc", resumed_from=resumed_from, enabled=enabled)


def train(trackers: Trackers, run: RunDir, records: list[dict], status: str = "finished") -> None:
    for record in records:
        trackers.log(record)
    run.lineage["status"] = status
    run._write()
    trackers.close(status)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    return stores.offline_trackers(monkeypatch, tmp_path / "stores")


@pytest.mark.parametrize("tracker", EACH)
def test_the_store_holds_the_records_the_config_and_the_run_files(tracker, offline, tmp_path):
    project = f"unit-{tmp_path.name}"  # trackio's store is shared by the session's tests: one project each
    run = make_run(tmp_path / "runs" / "sft-1")
    trackers = start_trackers(logger_config(project, [tracker], tags=["baseline"]), run, resumed=False)
    assert list(trackers.started) == [tracker]
    train(trackers, run, RECORDS)
    losses = [(1, 2.0), (2, 1.5)]
    evals = [(0, 2.5), (2, 1.25)]
    ids = json.loads((run.path / IDS_FILE).read_text())

    if tracker == "wandb":
        [logged] = stores.wandb_runs(tmp_path / "stores" / "wandb")
        assert (logged.id, logged.name, logged.project, logged.tags) == (ids["wandb"]["id"], "sft-1", project, ["baseline"])
        assert stores.wandb_series(logged, "train/loss") == losses
        assert stores.wandb_series(logged, "eval/loss") == evals
        assert stores.wandb_series(logged, "train/objective/kl") == [(1, 0.25), (2, 0.5)]
        assert stores.wandb_series(logged, "train/grad_norm") == [(1, 3.0)]  # nan stays out, as on TensorBoard
        assert logged.config["recipe"] == {"stage": "sft", "lr": 1e-3}
        assert sorted(logged.artifacts[f"run-{logged.id}"]) == ["config.yaml", "lineage.json"]
        assert logged.exit_code == 0
    if tracker == "mlflow":
        client, logged = stores.mlflow_run(offline["MLFLOW_TRACKING_URI"], project)
        assert logged.info.run_id == ids["mlflow"]["run_id"] and logged.info.run_name == "sft-1"
        assert stores.mlflow_series(client, logged.info.run_id, "loss") == losses
        assert stores.mlflow_series(client, logged.info.run_id, "eval_loss") == evals
        assert logged.data.params["recipe.lr"] == "0.001" and logged.data.params["seed"] == "0"
        assert logged.data.tags["alignctl.stage"] == "sft" and "baseline" in logged.data.tags
        assert logged.info.status == "FINISHED"
        files = sorted(a.path for a in client.list_artifacts(logged.info.run_id, "alignctl"))
        assert files == ["alignctl/config.yaml", "alignctl/lineage.json"]
        local = client.download_artifacts(logged.info.run_id, "alignctl/lineage.json", str(tmp_path))
        assert json.loads(Path(local).read_text())["status"] == "finished"
    if tracker == "trackio":
        assert stores.trackio_series(project, "sft-1", "train/loss") == losses
        assert stores.trackio_series(project, "sft-1", "eval/loss") == evals
        config = stores.trackio_config(project, "sft-1")
        assert config["recipe"] == {"stage": "sft", "lr": 1e-3} and config["tags"] == ["baseline"]
        assert [a["name"] for a in stores.trackio_artifacts(project)] == ["run-sft-1"]


@pytest.mark.parametrize("tracker", EACH)
def test_a_resumed_run_continues_the_same_tracker_run(tracker, offline, tmp_path):
    project = f"unit-{tmp_path.name}"
    path = tmp_path / "runs" / "sft-2"
    first = make_run(path)
    train(start_trackers(logger_config(project, [tracker]), first, resumed=False), first, RECORDS[:2], status="interrupted")
    ids = json.loads((path / IDS_FILE).read_text())
    resumed = make_run(path, resumed_from=1, lr=2e-3)  # a resume may change what does not change the run's hash
    trackers = start_trackers(logger_config(project, [tracker]), resumed, resumed=True)
    assert json.loads((path / IDS_FILE).read_text()) == ids
    train(trackers, resumed, RECORDS[2:])

    if tracker == "wandb":
        runs = stores.wandb_runs(tmp_path / "stores" / "wandb")  # offline, each process writes its own log of the one run
        assert [r.id for r in runs] == [ids["wandb"]["id"]] * 2 and [r.exit_code for r in runs] == [1, 0]
        assert stores.wandb_series(runs[0], "train/loss") + stores.wandb_series(runs[1], "train/loss") == [(1, 2.0), (2, 1.5)]
        assert runs[1].config["recipe"]["lr"] == 2e-3
    if tracker == "mlflow":
        client, logged = stores.mlflow_run(offline["MLFLOW_TRACKING_URI"], project)  # the only run of the experiment
        assert stores.mlflow_series(client, logged.info.run_id, "loss") == [(1, 2.0), (2, 1.5)]
        assert logged.info.status == "FINISHED"
    if tracker == "trackio":
        assert stores.trackio_series(project, "sft-2", "train/loss") == [(1, 2.0), (2, 1.5)]


def test_only_the_main_process_reports(tmp_path):
    run = make_run(tmp_path / "run", enabled=False)
    trackers = start_trackers(logger_config("p", ["wandb", "mlflow", "trackio"]), run, resumed=False)
    assert trackers.started == {} and not (tmp_path / "run" / IDS_FILE).exists()
    trackers.log(RECORDS[1])
    trackers.close("finished")


def test_a_tracker_that_cannot_start_is_one_line_and_fails_the_run(tmp_path, monkeypatch):
    class Refusing:
        def __init__(self, *args):
            raise RuntimeError("no API key configured\nsecond line of detail")

    monkeypatch.setitem(trackers_module.BUILDERS, "wandb", (Refusing, "Weights & Biases"))
    run = make_run(tmp_path / "run")
    with pytest.raises(UserError) as caught:
        start_trackers(logger_config("p", ["wandb"]), run, resumed=False)
    assert str(caught.value) == "logger.wandb: Weights & Biases could not start a run: no API key configured"
    assert json.loads((tmp_path / "run" / "lineage.json").read_text())["status"] == "failed"


def test_a_tracker_that_fails_to_close_does_not_hide_the_others(tmp_path, capsys):
    class Breaks:
        def finish(self, files, status):
            raise OSError("disk gone")

    class Closes:
        def finish(self, files, status):
            self.closed = (sorted(f.name for f in files), status)

    closes = Closes()
    trackers = Trackers(make_run(tmp_path / "run").path, {"wandb": Breaks(), "mlflow": closes})
    trackers.close("failed")
    trackers.close("failed")  # a second close does nothing
    assert closes.closed == (["config.yaml", "lineage.json"], "failed")
    assert "logger.wandb: Weights & Biases did not close cleanly: disk gone" in " ".join(capsys.readouterr().out.split())


def test_a_tracker_that_fails_mid_run_is_one_line_and_training_goes_on(tmp_path, capsys):
    class Drops:
        def __init__(self):
            self.logged, self.closed = [], None

        def log(self, step, metrics):
            if step == 1:
                raise ConnectionError("server unreachable\ntraceback detail")
            self.logged.append(step)

        def finish(self, files, status):
            self.closed = status

    class Keeps(Drops):
        def log(self, step, metrics):
            self.logged.append(step)

    drops, keeps = Drops(), Keeps()
    trackers = Trackers(make_run(tmp_path / "run").path, {"mlflow": drops, "wandb": keeps})
    for record in RECORDS:
        trackers.log(record)
    trackers.close("finished")
    assert drops.logged == [0] and keeps.logged == [0, 1, 2, 2]  # silenced after its failure; the other logs on
    assert (drops.closed, keeps.closed) == ("finished", "finished")  # still closed with the run
    out = " ".join(capsys.readouterr().out.split())
    assert "logger.mlflow: MLflow stopped taking metrics at step 1 (server unreachable); training goes on" in out
    assert out.count("logger.mlflow") == 1 and "traceback detail" not in out


@pytest.mark.parametrize("chosen", ["[wandb]", "[tensorboard,mlflow]", "[mlflow,trackio]", "tensorboard"])
def test_a_logger_whose_package_is_missing_names_its_extra(chosen, monkeypatch):
    found = importlib.util.find_spec
    absent = {"wandb", "mlflow", "trackio", "tensorboard"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else found(name, *a))
    first = chosen.strip("[]").split(",")[0]
    with pytest.raises(ConfigError, match=rf"^logger: {first} is not installed: pip install 'alignctl\[{first}\]'$"):
        validate(compose_config([f"logger={chosen}"]))


@pytest.mark.skipif(bool({"wandb", "mlflow"} & set(MISSING)), reason="needs wandb and mlflow (the dev extra)")
def test_several_loggers_compose_each_with_its_own_keys():
    logger = validate(compose_config(["logger=[tensorboard,wandb,mlflow]", "logger.wandb.mode=offline", "logger.tags=[a,b]"])).logger
    assert logger.tensorboard and logger.trackers() == ["wandb", "mlflow"] and logger.tags == ["a", "b"]
    assert (logger.project, logger.run_name, logger.log_every) == ("alignctl", None, 10)
    default = validate(compose_config([])).logger
    assert not default.tensorboard and default.trackers() == []


@pytest.mark.parametrize(("recorded", "closed_as"), [("failed", "failed"), ("interrupted", "interrupted"), (None, "failed")])
def test_the_session_closes_its_trackers_when_training_stops_early(recorded, closed_as, tmp_path, monkeypatch):
    from alignctl.train import session as session_module
    from alignctl.train.metrics import MetricsLogger

    closed = []

    class Recording:
        def finish(self, files, status):
            closed.append(status)

    run = make_run(tmp_path / "run")

    def stops(session, *args):
        if recorded:  # as _train_and_finish records a failure or a Ctrl-C in lineage.json before it re-raises
            session.run.lineage["status"] = recorded
        raise RuntimeError("boom")

    monkeypatch.setattr(session_module, "_train_and_finish", stops)
    logger = MetricsLogger(run.path, 3, 0, tensorboard=False, log_every=1, trackers=Trackers(run.path, {"wandb": Recording()}))
    session = session_module.TrainingSession(run, None, None, None, None, None, None, None, logger)
    with pytest.raises(RuntimeError, match="boom"):
        session.train(None, None, None, ())
    logger.close()
    assert closed == [closed_as]


def test_trackers_started_before_the_metrics_logger_failed_to_build_are_closed(tmp_path):
    from alignctl.train.session import logger_owning

    closed = []

    class Recording:
        def finish(self, files, status):
            closed.append(status)

    def unwritable():
        raise PermissionError("tensorboard/: permission denied")

    trackers = Trackers(make_run(tmp_path / "run").path, {"wandb": Recording()})
    with pytest.raises(PermissionError):
        logger_owning(trackers, unwritable)
    assert closed == ["failed"]
