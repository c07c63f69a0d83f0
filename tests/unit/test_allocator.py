"""alignctl.core.allocator: which allocator a command runs under, and the one-line refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignctl.core import allocator


@pytest.fixture
def installed(monkeypatch):
    """Pretend exactly these allocators are installed."""

    def use(*names):
        monkeypatch.setattr(allocator, "find", lambda name: f"lib{name}.so.2" if name in names else None)

    return use


def test_auto_prefers_jemalloc_then_tcmalloc_then_the_system(installed):
    installed("jemalloc", "tcmalloc")
    assert allocator.environment({})["LD_PRELOAD"] == "libjemalloc.so.2"
    installed("tcmalloc")
    assert allocator.environment({"PATH": "/bin"}) == {"PATH": "/bin", "LD_PRELOAD": "libtcmalloc.so.2"}
    installed()
    assert allocator.environment({}) is None


def test_an_existing_preload_is_kept_and_an_allocator_in_it_wins(installed):
    installed("jemalloc")
    assert allocator.environment({"LD_PRELOAD": "libfoo.so"})["LD_PRELOAD"] == "libjemalloc.so.2:libfoo.so"
    assert allocator.environment({"LD_PRELOAD": "/opt/libtcmalloc.so"}) is None
    assert allocator.environment({allocator.VARIABLE: "system"}) is None


def test_a_requested_allocator_that_is_missing_or_unknown_is_refused(installed, capsys):
    installed()
    with pytest.raises(SystemExit) as stop:
        allocator.environment({allocator.VARIABLE: "jemalloc"})
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "alignctl: ALIGNCTL_ALLOCATOR=jemalloc: libjemalloc is not installed (apt-get install libjemalloc2); or use auto or system")
    with pytest.raises(SystemExit):
        allocator.environment({allocator.VARIABLE: "mimalloc"})
    assert "valid: auto, jemalloc, tcmalloc, system" in capsys.readouterr().err


@pytest.mark.skipif(allocator.find("jemalloc") is None, reason="jemalloc is not installed (apt-get install libjemalloc2)")
def test_the_preload_takes_effect_and_is_seen(tmp_path):
    script = tmp_path / "which.py"
    script.write_text("from alignctl.core import allocator; print(allocator.active())")
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    under = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=allocator.environment({"PATH": "/usr/bin:/bin"}))
    assert (plain.stdout.strip(), under.stdout.strip()) == ("system", "jemalloc")
