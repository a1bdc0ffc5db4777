"""Checks the README's links into the documentation site and the repository.

    python docs/check_links.py README.md docs/_build/html

* A link that starts with the documentation base URL (``[project.urls]
  Documentation`` in ``pyproject.toml``) must name a page of the built site,
  and its ``#anchor``, if any, must be an ``id`` in that page.
* A link to ``<Source>/blob/main/<path>`` or ``<Source>/tree/main/<path>``
  (``[project.urls] Source``) must name a file or folder of the checkout.
* A relative link is broken: it stops working where the README is shown
  away from the repository (a package index).

Every broken link is listed; the exit status is 1 if there is one.
"""

from __future__ import annotations

import argparse
import html.parser
import pathlib
import re
import sys
import urllib.parse

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
# Markdown links and images, [text](url "title"), <url> autolinks and
# reference definitions, [name]: url.
_LINK = re.compile(
    r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
    r"|<(https?://[^>\s]+)>"
    r"|^ {0,3}\[[^\]]+\]:\s*<?([^>\s]+)>?",
    re.MULTILINE,
)


def project_url(pyproject: pathlib.Path, name: str) -> str | None:
    """``[project.urls] <name>`` of ``pyproject``, or None if it is missing."""
    with open(pyproject, "rb") as f:
        urls = tomllib.load(f).get("project", {}).get("urls", {})
    url = urls.get(name)
    return url if isinstance(url, str) and url else None


def documentation_url(pyproject: pathlib.Path) -> str | None:
    """``[project.urls] Documentation`` of ``pyproject``, or None if it is missing."""
    return project_url(pyproject, "Documentation")


# The one project address, as pyproject.toml gives it.
REPOSITORY = (project_url(PYPROJECT, "Source") or "").rstrip("/")


def links(markdown: str) -> list[str]:
    """Every link target of a markdown text, in order (code spans excluded)."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.DOTALL | re.MULTILINE)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [a or b or c for a, b, c in _LINK.findall(text)]


class _Ids(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value and (key == "id" or (tag == "a" and key == "name")):
                self.ids.add(value)


def html_ids(page: pathlib.Path) -> set[str]:
    """The ``id`` attributes (and ``<a name>``) of an HTML page."""
    parser = _Ids()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.ids


def check_site_link(url: str, base: str, site: pathlib.Path) -> str | None:
    """Why ``url`` (under ``base``) is broken in the built ``site``, or None."""
    parsed = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parsed.path)
    relative = path[len(urllib.parse.urlsplit(base).path) :]
    page = site / relative
    if not relative or relative.endswith("/"):
        page = page / "index.html"
    if not page.is_file():
        return f"no page {page.relative_to(site).as_posix()} in {site}"
    anchor = urllib.parse.unquote(parsed.fragment)
    if anchor and anchor not in html_ids(page):
        return f"no id {anchor!r} in {page.relative_to(site).as_posix()}"
    return None


def check_repository_link(url: str, root: pathlib.Path) -> str | None:
    """Why a ``blob/main`` or ``tree/main`` ``url`` is broken in ``root``, or None."""
    rest = url[len(REPOSITORY) :]
    match = re.fullmatch(r"/(blob|tree)/main(?:/([^#?]*))?(?:[?#].*)?", rest)
    if match is None:
        return None  # issues, releases, other branches: not files of the checkout
    kind, path = match.group(1), urllib.parse.unquote(match.group(2) or "").rstrip("/")
    target = root / path
    if kind == "blob" and not target.is_file():
        return f"no file {path!r} in the checkout"
    if kind == "tree" and not target.is_dir():
        return f"no folder {path!r} in the checkout"
    return None


def broken_links(
    readme: pathlib.Path, site: pathlib.Path, base: str | None, root: pathlib.Path
) -> list[str]:
    """``"url: reason"`` for every broken link of ``readme``."""
    broken = []
    for url in links(readme.read_text(encoding="utf-8")):
        reason = None
        if base and url.startswith(base):
            reason = check_site_link(url, base, site)
        elif REPOSITORY and (url == REPOSITORY or url.startswith(f"{REPOSITORY}/")):
            reason = check_repository_link(url, root)
        elif not re.match(r"[a-z][a-z+.-]*:|#", url):
            reason = "a relative link, broken wherever the README is shown off-repo"
        if reason:
            broken.append(f"{url}: {reason}")
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readme", type=pathlib.Path)
    parser.add_argument("site", type=pathlib.Path, help="the built HTML site")
    parser.add_argument(
        "--root",
        type=pathlib.Path,
        default=pathlib.Path("."),
        help="the checkout (default: the current folder)",
    )
    parser.add_argument(
        "--base-url",
        help="the site's base URL (default: [project.urls] Documentation in "
        "ROOT/pyproject.toml)",
    )
    args = parser.parse_args(argv)
    base = args.base_url or documentation_url(args.root / "pyproject.toml")
    if base is None:
        print("check_links: no [project.urls] Documentation; site links unchecked")
    broken = broken_links(args.readme, args.site, base, args.root)
    for line in broken:
        print(f"{args.readme}: broken link {line}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
