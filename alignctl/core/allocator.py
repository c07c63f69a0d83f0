"""The host-memory allocator alignctl runs under: jemalloc (or tcmalloc) where installed.

A training step frees and reallocates the same few hundred activation buffers, of many sizes, every
step. glibc's malloc serves them from heaps it seldom gives back, and the holes left between live
blocks grow the resident set step after step: on the CPU benchmark a LoRA DPO step peaked at about
500 MiB resident for about 240 MiB of live tensors. jemalloc's size classes and page purging keep
the two close and, with fewer page faults, the step is faster too (PyTorch's CPU performance guide
and its ``torch.backends.xeon.run_cpu`` launcher recommend the same). GPU memory is not concerned:
CUDA has its own caching allocator.

An allocator must be in place before the process starts, so the CLI re-executes itself once with
``LD_PRELOAD`` set (same PID, same arguments). ``ALIGNCTL_ALLOCATOR`` chooses: ``auto`` (default:
jemalloc, else tcmalloc, else the system's), ``jemalloc``, ``tcmalloc`` or ``system``. Child
processes (torchrun's workers, pipeline stages) inherit the choice.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping

VARIABLE = "ALIGNCTL_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "tcmalloc", "system")
LIBRARIES = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc_minimal", "tcmalloc")}  # ctypes.util.find_library names


def find(name: str) -> str | None:
    """The shared library of allocator `name` (a soname the dynamic linker resolves), or None."""
    for library in LIBRARIES[name]:
        found = ctypes.util.find_library(library)
        if found:
            return found
    return None


def preloaded(env: Mapping[str, str]) -> str | None:
    """The allocator LD_PRELOAD already names, if any."""
    preload = env.get("LD_PRELOAD", "")
    return next((name for name in LIBRARIES if name in preload), None)


def environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """`env` with LD_PRELOAD naming the allocator ALIGNCTL_ALLOCATOR asks for; None when nothing is to
    change (system allocator, one already preloaded, or auto with none installed).

    Raises SystemExit(2) with one line for an unknown choice or a requested allocator not installed."""
    choice = env.get(VARIABLE, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        _refuse(f"{VARIABLE}={choice!r} is not an allocator; valid: {', '.join(CHOICES)}")
    if choice == "system" or preloaded(env):
        return None
    names = ("jemalloc", "tcmalloc") if choice == "auto" else (choice,)
    for name in names:
        library = find(name)
        if library:
            preload = env.get("LD_PRELOAD", "")
            return {**env, "LD_PRELOAD": f"{library}:{preload}" if preload else library}
    if choice != "auto":
        package = "libjemalloc2" if choice == "jemalloc" else "libtcmalloc-minimal4"
        _refuse(f"{VARIABLE}={choice}: lib{choice} is not installed (apt-get install {package}); or use auto or system")
    return None


def reexec_under_allocator() -> None:
    """Re-execute this command under the chosen allocator, once; returns when there is nothing to do."""
    if os.environ.get("ALIGNCTL_ALLOCATOR_SET"):  # already re-executed (or the allocator failed to preload)
        return
    env = environment(os.environ)
    if env is None:
        return
    env["ALIGNCTL_ALLOCATOR_SET"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "alignctl", *sys.argv[1:]], env)


def active() -> str:
    """The allocator this process runs under: what is mapped into it, not what was asked for."""
    try:
        maps = open("/proc/self/maps").read()  # noqa: SIM115 (Linux only; elsewhere: unknown)
    except OSError:
        return "unknown"
    return next((name for name in LIBRARIES if f"lib{name}" in maps), "system")


def _refuse(message: str) -> None:
    print(f"alignctl: {message}", file=sys.stderr)
    raise SystemExit(2)
