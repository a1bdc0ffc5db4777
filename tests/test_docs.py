"""Every ```python block of the README and docs/recipes runs as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "recipes").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PRINTS = re.compile(r"^prints\n\n```text\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(page: pathlib.Path) -> str:
    return "\n".join(BLOCK.findall(page.read_text()))


def run_page(page: pathlib.Path) -> dict:
    namespace = {"__name__": "__main__"}
    exec(compile(python_blocks(page), str(page), "exec"), namespace)
    return namespace


def test_the_readme_links_the_recipes_page():
    # Each recipe is in the site's toctree (tests/test_docs_site.py).
    assert "/recipes.html" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_runs(page, capsys):
    assert python_blocks(page).strip(), f"{page.name} has no python block"
    run_page(page)
    printed = capsys.readouterr().out
    assert printed.strip()  # every page prints its result
    # A "prints" block shows lines of that output, in order ("..." skips some).
    lines = [line.rstrip() for line in printed.splitlines()]
    for shown in PRINTS.findall(page.read_text()):
        at = 0
        for line in shown.splitlines():
            if line != "...":
                assert line in lines[at:], f"{page.name}: not printed: {line!r}"
                at = lines.index(line, at) + 1
