"""Puts tests/ on sys.path (pytest's default import mode adds a conftest's folder), so unit and
integration tests share the modules kept here: tracker_stores (reading back what the experiment
trackers wrote) and saved_tensors (what autograd keeps for backward)."""

import os
import sys


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers), each worker gets its share of the cores:
    torch's default of one thread per core in every worker would oversubscribe them, and a torch
    op waiting on a descheduled thread is many times slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    # xdist's workers are started with COLUMNS=80 and LINES=24, which alignctl's console (and the CLI
    # processes tests start) would take for a terminal's size: piped output must stay unlimited in
    # width, as it is in one process. A test that wants a width sets COLUMNS itself.
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)
    threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
    if "torch" in sys.modules:  # already imported by a plugin: the variables come too late for it
        sys.modules["torch"].set_num_threads(int(threads))
