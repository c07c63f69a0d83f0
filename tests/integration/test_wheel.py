"""The wheel is self-contained: built from the repository, installed into a fresh venv (reusing the
dev venv's dependencies, no download), it runs `alignctl --help` and a short training run from a
directory outside the source tree, with conf/, recipes/ and the task data coming from the wheel.

Building and installing the wheel takes minutes: those tests go with the slow tier (make test-slow).
The default tier checks the same contents without a build: pyproject.toml's packages and
package-data patterns, applied to the source tree, cover every file the wheel must carry."""

from __future__ import annotations

import glob
import shutil
import site
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

# Build from a copy: a build writes build/ and *.egg-info next to the sources it reads.
COPY_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "runs", "outputs", "multirun", "__pycache__",
    ".pytest_cache", ".ruff_cache", "tests", "bench",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, run_cmd, repo_root) -> Path:
    root = tmp_path_factory.mktemp("wheel_build")
    source = root / "src"
    shutil.copytree(repo_root, source, ignore=COPY_IGNORE, symlinks=True)
    out = root / "dist"
    result = run_cmd(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(source)],
        cwd=root,
    )
    assert result.returncode == 0, result.describe()
    wheels = list(out.glob("alignctl-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_pyproject_packs_every_config_recipe_task_file_and_module(repo_root):
    setuptools = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs, packages, data = setuptools["package-dir"], setuptools["packages"], setuptools["package-data"]

    def source(package: str) -> Path:
        top, _, rest = package.partition(".")
        if package in dirs:
            return repo_root / dirs[package]
        return repo_root / dirs[top] / rest.replace(".", "/")

    packed = {p.resolve() for package in packages for p in source(package).glob("*.py")}
    for package, patterns in data.items():
        packed |= {Path(f).resolve() for pattern in patterns for f in glob.glob(str(source(package) / pattern))}
    wanted = [*(repo_root / "conf").rglob("*.yaml"), *(repo_root / "recipes").glob("*.yaml"), *(repo_root / "alignctl").rglob("*.py")]
    for folder in ("data", "chat_data"):
        found = sorted((repo_root / "alignctl" / "data" / "tasks" / folder).glob("*.jsonl"))
        assert found, f"the built-in task data ({folder}) is missing from the source tree"
        wanted += found
    missing = sorted(str(p.relative_to(repo_root)) for p in wanted if p.resolve() not in packed and "__pycache__" not in p.parts)
    assert not missing, f"not in the wheel: {missing}"
    scripts = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["alignctl"] == "alignctl.cli.main:main"


@pytest.mark.slow
def test_wheel_contents(wheel, repo_root):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted(repo_root.joinpath("conf").rglob("*.yaml")):
        assert f"alignctl/conf/{path.relative_to(repo_root / 'conf').as_posix()}" in names
    for path in repo_root.joinpath("recipes").glob("*.yaml"):
        assert f"alignctl/recipes/{path.name}" in names
    for folder in ("data", "chat_data"):
        data = sorted(repo_root.joinpath("alignctl", "data", "tasks", folder).glob("*.jsonl"))
        assert data, f"the built-in task data ({folder}) is missing from the source tree"
        for path in data:
            assert f"alignctl/data/tasks/{folder}/{path.name}" in names
    assert "alignctl/stages/sft.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "alignctl = alignctl.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory, run_cmd) -> Path:
    """A fresh venv whose only own package is the wheel; the dependencies come from the dev venv."""
    venv = tmp_path_factory.mktemp("wheel_venv") / "venv"
    result = run_cmd([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert result.returncode == 0, result.describe()
    python = venv / "bin" / "python"
    purelib = run_cmd([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    new_site = Path(purelib.stdout.strip())
    # Only the dev venv's site-packages directory itself: its .pth files (the editable install's path
    # hook for the source tree among them) are not processed from a directory added this way.
    dev_sites = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    new_site.joinpath("_dev_dependencies.pth").write_text("\n".join(sorted(dev_sites)) + "\n")
    install = run_cmd(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        cwd=venv.parent,
    )
    assert install.returncode == 0, install.describe()
    return venv


@pytest.mark.slow
def test_installed_wheel_is_the_one_imported(venv, tmp_path, run_cmd):
    code = "import alignctl, alignctl.cli.app as h; print(alignctl.__file__); print(h.conf_dir())"
    result = run_cmd([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    module_file, conf = (Path(line) for line in result.stdout.split())
    assert venv.resolve() in module_file.resolve().parents, f"alignctl imported from {module_file}"
    assert venv.resolve() in conf.resolve().parents, f"conf/ read from {conf}"


@pytest.mark.slow
def test_wheel_cli_help_and_training(venv, tmp_path, run_cmd):
    alignctl = str(venv / "bin" / "alignctl")
    work = tmp_path / "elsewhere"
    work.mkdir()

    help_ = run_cmd([alignctl, "--help"], cwd=work, timeout=120)
    assert help_.returncode == 0, help_.describe()
    assert "train" in help_.stdout and "sft" in help_.stdout and "lora" in help_.stdout

    bad = run_cmd([alignctl, "train", "recipe=foo"], cwd=work, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("alignctl: error: recipe=foo"), bad.describe()

    run_dir = tmp_path / "run"
    result = run_cmd(
        [alignctl, "train", "recipe=sft", "recipe.max_steps=2", "data.eval_limit=10", f"hydra.run.dir={run_dir}"],
        cwd=work,
    )
    assert result.returncode == 0, result.describe()
    assert "Traceback" not in result.output
    lineage = (run_dir / "lineage.json").read_text()
    assert '"status": "finished"' in lineage
    assert (run_dir / "checkpoint" / "model.safetensors").exists()
    assert not (work / "runs").exists() and not (work / "outputs").exists(), "the run went somewhere else too"
