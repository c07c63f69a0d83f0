"""The README stays a five-minute read that points into docs/, and `make bench` writes its table there.

The README holds the two commands, a tour, the recipe table, the pipeline, the demo's results, a map of
the package and the design; everything else lives in docs/*.md, so a link that points nowhere or a
module missing from the map means a newcomer is sent the wrong way."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")  # [text](target) or [text](target#anchor)


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text()) if "://" not in target]


@pytest.fixture(scope="module")
def bench():
    """scripts/bench.py as a module (its dataclasses need it in sys.modules while it loads)."""
    spec = importlib.util.spec_from_file_location("alignctl_bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_readme_is_a_five_minute_read():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/ (limit 200)"


def test_readme_links_into_docs_and_every_guide_is_linked():
    targets = relative_links(README)
    doc_links = {t for t in targets if t.startswith("docs/") and t.endswith(".md")}
    assert doc_links, "the README links to no docs/*.md page"
    missing = sorted(t for t in doc_links if not (ROOT / t).is_file())
    assert not missing, f"README links to docs pages that do not exist: {missing}"
    index_links = {f"docs/{t}" for t in relative_links(ROOT / "docs" / "README.md")}
    orphans = sorted(p.relative_to(ROOT).as_posix() for p in PAGES[1:] if p.name != "README.md"
                     and p.relative_to(ROOT).as_posix() not in doc_links | index_links)
    assert not orphans, f"docs pages no one links to (add them to the README or docs/README.md): {orphans}"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = sorted(t for t in relative_links(page) if not (page.parent / t).exists())
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_the_package_map_names_every_module():
    text = README.read_text()
    package = ROOT / "alignctl"
    modules = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py") if not p.name.startswith("__"))
    unnamed = [m for m in modules if Path(m).name not in text and Path(m).stem not in text]
    assert not unnamed, f"README's package map does not name: {unnamed}"


def test_bench_writes_its_table_between_the_markers_of_the_performance_page(tmp_path, bench):
    assert bench.PERFORMANCE_DOC == ROOT / "docs" / "performance.md"
    bench.check_doc(bench.PERFORMANCE_DOC)  # the real page is ready for `make bench`
    page = tmp_path / "performance.md"
    page.write_text(f"# Performance\nbefore\n{bench.TABLE_START}\nold table\n{bench.TABLE_END}\nafter\n")
    bench.update_doc("| case |\n|---|\n| sft |\n", page)
    assert page.read_text() == f"# Performance\nbefore\n{bench.TABLE_START}\n| case |\n|---|\n| sft |\n{bench.TABLE_END}\nafter\n"


def test_bench_refuses_a_page_without_markers_before_measuring(tmp_path, bench):
    page = tmp_path / "performance.md"
    page.write_text("# Performance\nno markers here\n")
    with pytest.raises(SystemExit, match="performance.md has no <!-- bench:start -->"):
        bench.check_doc(page)
    with pytest.raises(SystemExit, match="has no"):
        bench.check_doc(tmp_path / "missing.md")
