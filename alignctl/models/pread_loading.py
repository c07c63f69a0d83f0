"""Checkpoints read with pread, not mapped: a model loads at the memory it will hold.

transformers opens safetensors files with mmap. While a checkpoint loads, every page of the file it
touches counts in the process's resident set, so loading a float32 checkpoint into a bf16 model
peaks at the whole file on top of the model it becomes: SmolLM2-135M-Instruct (538 MB float32 on disk,
257 MiB in bf16) peaked at 1.12 GB resident for 0.61 GB after loading. That peak is the run's own
peak resident set whenever training needs less than it (a GRPO run with LoRA on this model).

safetensors (0.7 and later) can read each tensor with pread instead, into memory that is freed once
the tensor is converted: the same tensors, a peak of 0.61 GB, and a load twice as fast on these
machines (0.58 against 1.09 s), since no page faults are taken. transformers itself takes that backend
where mmap does not work (Windows, MPS); `reads_not_mapped` makes it take it for every CPU read while
alignctl loads a model. An older safetensors without backends is left as it is.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import transformers.modeling_utils as modeling_utils

_lock = threading.Lock()
_depth = 0
_mapped_open = getattr(modeling_utils, "safe_open", None)  # None: a transformers that reads otherwise


def _pread_open(file, framework, device="cpu", backend=None, **kwargs):
    """transformers' safe_open call with backend="pread" where it reads into host memory."""
    if device == "cpu" and backend in (None, "mmap"):
        try:
            return _mapped_open(file, framework=framework, device=device, backend="pread", **kwargs)
        except TypeError:  # a safetensors without the backend argument
            pass
    if backend is None:
        return _mapped_open(file, framework=framework, device=device, **kwargs)
    return _mapped_open(file, framework=framework, device=device, backend=backend, **kwargs)


@contextlib.contextmanager
def _reading():
    global _depth
    if _mapped_open is None:
        yield
        return
    with _lock:
        if _depth == 0:
            modeling_utils.safe_open = _pread_open
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                modeling_utils.safe_open = _mapped_open


def reads_not_mapped(function):
    """Decorate a model-loading function: transformers reads checkpoints with pread while it runs
    (re-entrant: nested loaders restore transformers' own reader when the outermost returns)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _reading():
            return function(*args, **kwargs)

    return wrapper
