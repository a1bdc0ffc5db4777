"""The documentation site's sources and its link checker (no Sphinx needed).

The site itself is built by ``.ci/docs``; these tests read the sources: every
public name has its entry on the API page, every recipe is in the site, the
pages' code runs, and ``docs/check_links.py`` finds broken README links.
"""

import ast
import importlib.util
import inspect
import pathlib
import re

import pytest

import optax_gc

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.rst"
DIRECTIVE = re.compile(r"^\.\. (auto\w+|py:\w+)::\s*(\S+)", re.MULTILINE)
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PRINTS = re.compile(r"^prints\n\n```text\n(.*?)^```", re.DOTALL | re.MULTILINE)
# Which directive documents which kind of object.
KINDS = {
    "autofunction": "function",
    "autoclass": "class",
    "autoexception": "exception",
    "autotypealias": "type alias",
}


def _load_check_links():
    spec = importlib.util.spec_from_file_location(
        "check_links", DOCS / "check_links.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_links = _load_check_links()


def api_entries() -> list[tuple[str, str]]:
    """``(directive, name)`` of every entry of the API page."""
    text = API_PAGE.read_text()
    assert ".. currentmodule:: optax_gc" in text
    return [
        (directive, name.removeprefix("optax_gc."))
        for directive, name in DIRECTIVE.findall(text)
        if directive != "py:currentmodule"
    ]


def type_alias_names() -> set[str]:
    """Names assigned as ``Name: TypeAlias = ...`` in the package's modules."""
    names = set()
    for path in (ROOT / "optax_gc").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and ast.unparse(node.annotation).split(".")[-1] == "TypeAlias"
            ):
                names.add(node.target.id)
    return names


def kind(name: str) -> str:
    if name in type_alias_names():
        return "type alias"
    obj = getattr(optax_gc, name)
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    return "function" if callable(obj) else "data"


def test_every_public_name_has_an_api_entry():
    documented = {name for _, name in api_entries()}
    missing = sorted(set(optax_gc.__all__) - documented)
    assert not missing, f"add an entry to docs/api.rst for {missing}"


def test_api_entries_are_public_names_documented_once():
    names = [name for _, name in api_entries()]
    assert not sorted(set(names) - set(optax_gc.__all__)), "not in optax_gc.__all__"
    assert len(names) == len(set(names)), "a name is documented twice"


@pytest.mark.parametrize("directive, name", api_entries(), ids=lambda x: str(x))
def test_api_entry_directive_fits_the_object(directive, name):
    # autodata on a type alias would show typing's docstring of Union.
    assert KINDS.get(directive) == kind(name), (
        f"{name} is a {kind(name)}: use "
        + " or ".join(d for d, k in KINDS.items() if k == kind(name))
    )


def test_warnings_show_their_base_class():
    text = API_PAGE.read_text()
    for directive, name in api_entries():
        if directive == "autoexception":
            entry = f".. autoexception:: {name}\n   :show-inheritance:\n"
            assert entry in text, name


def test_every_recipe_is_in_the_site():
    toctree = (DOCS / "recipes.md").read_text()
    for page in sorted((DOCS / "recipes").glob("*.md")):
        assert re.search(rf"^recipes/{page.stem}$", toctree, re.MULTILINE), page.name


PAGES = [p for p in sorted(DOCS.glob("*.md")) if BLOCK.search(p.read_text())]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_code_runs_and_prints_what_it_shows(page, capsys):
    text = page.read_text()
    exec(compile("\n".join(BLOCK.findall(text)), str(page), "exec"), {})
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    for shown in PRINTS.findall(text):  # in order; "..." skips lines
        at = 0
        for line in shown.splitlines():
            if line != "...":
                assert line in lines[at:], f"{page.name}: not printed: {line!r}"
                at = lines.index(line, at) + 1


# docs/check_links.py, on a fake site and checkout.

BASE = "https://optax-gc.readthedocs.io/en/latest/"
REPO = "https://github.com/optax-gc/optax-gc"


def test_the_repository_address_is_the_one_in_pyproject():
    assert check_links.REPOSITORY == REPO
    assert check_links.project_url(ROOT / "pyproject.toml", "Homepage") == REPO


@pytest.fixture
def checkout(tmp_path):
    """A checkout with pyproject.toml, two files, and a built site."""
    (tmp_path / "pyproject.toml").write_text(
        f'[project]\nname = "x"\n\n[project.urls]\nDocumentation = "{BASE}"\n'
    )
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "README.md").write_text("# Benchmarks\n")
    site = tmp_path / "docs" / "_build" / "html"
    (site / "recipes").mkdir(parents=True)
    (site / "index.html").write_text('<html><body><section id="install">')
    (site / "inference.html").write_text(
        '<h2 id="the-explain-table">x</h2><a name="old-anchor"></a>'
        '<dt id="optax_gc.explain">'
    )
    (site / "recipes" / "equinox.html").write_text("<p>no ids</p>")
    return tmp_path


def test_documentation_url(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project.urls]\nDocumentation = "{BASE}"\n')
    assert check_links.documentation_url(pyproject) == BASE
    pyproject.write_text('[project]\nname = "x"\n')
    assert check_links.documentation_url(pyproject) is None
    pyproject.write_text('[project.urls]\nHomepage = "https://example.org"\n')
    assert check_links.documentation_url(pyproject) is None


def test_links_finds_every_kind_and_skips_code():
    markdown = (
        f"See [the docs]({BASE}api.html#optax_gc.centralize) and\n"
        f'![figure]({REPO}/blob/main/a.png "a title"), <{BASE}index.html>.\n'
        f"`[not a link]({BASE}code.html)`\n"
        f"```python\nx = '[nor this]({BASE}block.html)'\n```\n"
        f"[ref]: {BASE}changelog.html\n"
    )
    assert check_links.links(markdown) == [
        f"{BASE}api.html#optax_gc.centralize",
        f"{REPO}/blob/main/a.png",
        f"{BASE}index.html",
        f"{BASE}changelog.html",
    ]


@pytest.mark.parametrize(
    "path, broken",
    [
        ("", False),  # the base URL itself: index.html
        ("index.html", False),
        ("index.html#install", False),
        ("inference.html#the-explain-table", False),
        ("inference.html#optax_gc.explain", False),
        ("inference.html#old-anchor", False),  # <a name="...">
        ("recipes/equinox.html", False),
        ("inference.html#no-such-heading", True),
        ("missing.html", True),
        ("recipes/missing.html", True),
        ("recipes/equinox.html#anchor", True),
        ("recipes/", True),  # no recipes/index.html
        ("inference", True),  # pages end in .html
    ],
)
def test_check_site_link(checkout, path, broken):
    site = checkout / "docs" / "_build" / "html"
    reason = check_links.check_site_link(BASE + path, BASE, site)
    assert (reason is not None) == broken, reason


@pytest.mark.parametrize(
    "url, broken",
    [
        (f"{REPO}/blob/main/benchmarks/README.md", False),
        (f"{REPO}/blob/main/benchmarks/README.md#inference-time", False),
        (f"{REPO}/tree/main/benchmarks/results", False),
        (f"{REPO}/tree/main/benchmarks/results/", False),
        (f"{REPO}/tree/main", False),
        (f"{REPO}/blob/main/benchmarks/MISSING.md", True),
        (f"{REPO}/blob/main/benchmarks/results", True),  # a folder, not a file
        (f"{REPO}/tree/main/benchmarks/README.md", True),  # a file, not a folder
        (f"{REPO}/tree/main/missing", True),
        (f"{REPO}/issues", False),  # not a file of the checkout
        (f"{REPO}/blob/v0.1.0/gone.md", False),  # another ref: not checked
    ],
)
def test_check_repository_link(checkout, url, broken):
    reason = check_links.check_repository_link(url, checkout)
    assert (reason is not None) == broken, reason


def test_main_lists_every_broken_link(checkout, capsys, monkeypatch):
    readme = checkout / "README.md"
    readme.write_text(
        f"[ok]({BASE}inference.html#the-explain-table)\n"
        f"[gone]({BASE}gone.html)\n"
        f"[bad anchor]({BASE}index.html#nope)\n"
        f"[file]({REPO}/blob/main/benchmarks/README.md)\n"
        f"[missing]({REPO}/blob/main/nothing.py)\n"
        "[elsewhere](https://arxiv.org/abs/2004.01461)\n"
        "[relative](docs/axes.md) ![figure](benchmarks/a.png) [here](#install)\n"
    )
    monkeypatch.chdir(checkout)
    assert check_links.main(["README.md", "docs/_build/html"]) == 1
    err = capsys.readouterr().err
    assert f"{BASE}gone.html" in err
    assert f"{BASE}index.html#nope" in err
    assert f"{REPO}/blob/main/nothing.py" in err
    assert "docs/axes.md: a relative link" in err
    assert "benchmarks/a.png: a relative link" in err
    assert len(err.strip().splitlines()) == 5

    readme.write_text(f"[ok]({BASE}index.html#install)\n")
    assert check_links.main(["README.md", "docs/_build/html"]) == 0


def test_main_without_a_documentation_url(checkout, capsys, monkeypatch):
    (checkout / "pyproject.toml").write_text('[project]\nname = "x"\n')
    (checkout / "README.md").write_text(f"[a]({BASE}gone.html)\n")
    monkeypatch.chdir(checkout)
    assert check_links.main(["README.md", "docs/_build/html"]) == 0
    assert "unchecked" in capsys.readouterr().out
    # The base URL can be given instead.
    args = ["README.md", "docs/_build/html", "--base-url", BASE]
    assert check_links.main(args) == 1
