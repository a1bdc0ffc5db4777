"""Sphinx glue for the optax_gc API page (loaded by ``docs/conf.py``).

* ``.. autotypealias:: Name`` documents a type alias of the package: its
  value as written in the source and the string literal placed under it.
  ``autodata`` would show Python's docstring of ``Union`` or ``Literal``,
  since a type alias has no docstring of its own.
* Classes are shown by name, without their constructor's signature: users
  get their instances from a function (``path_rules`` returns a
  ``PathRules``), never by calling the constructor.
* Signatures keep alias names (``OutputAxes``, ``optax.ScalarOrSchedule``)
  instead of the expanded unions, through ``autodoc_type_aliases``; see
  :func:`type_aliases`.
* Base classes defined in a private module and exported by the package are
  shown by their public name (``optax_gc.OptaxGCWarning``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from typing import Any

import sphinx
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docstrings import prepare_docstring
from sphinx.util.docutils import SphinxDirective

PACKAGE = "optax_gc"

# Sphinx unwraps an alias only at the top of an annotation; inside
# ``Alias | None`` or ``Mapping[str, Alias]`` it prints the placeholder's repr.
_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([^']*)'\)")
# ``Callable[..., Any]`` comes back from typing as ``Callable[[...], Any]``.
_ANY_ARGS = re.compile(r"Callable\[\[\.\.\.\],")
# Names of other packages written in the package's annotations.
_EXTERNAL = re.compile(r"\b(?:optax|jax)(?:\.[A-Za-z_]\w*)+")


def type_aliases(package: str = PACKAGE) -> dict[str, str]:
    """``autodoc_type_aliases``: names shown as written, not expanded.

    Every public name of the package (``OutputAxes`` -> ``optax_gc.OutputAxes``)
    and every ``optax.*``/``jax.*`` name in the annotations of its public
    functions and methods (``optax.ScalarOrSchedule`` stays itself). The
    modules use ``from __future__ import annotations``, so the annotations
    are the source text.
    """
    module = importlib.import_module(package)
    aliases = {name: f"{package}.{name}" for name in module.__all__}
    for name in module.__all__:
        obj = getattr(module, name)
        functions = [obj, *vars(obj).values()] if inspect.isclass(obj) else [obj]
        for fn in functions:
            annotations = getattr(fn, "__annotations__", None)
            if not callable(fn) or not isinstance(annotations, dict):
                continue
            for text in annotations.values():
                if isinstance(text, str):
                    aliases.update((x, x) for x in _EXTERNAL.findall(text))
    return aliases


def _alias_source(package: str, name: str) -> tuple[str, str, list[str]] | None:
    """``(module, value, docstring lines)`` of a ``Name: TypeAlias = ...``."""
    obj = getattr(importlib.import_module(package), name)
    for modname, module in sorted(sys.modules.items()):
        if (
            not modname.startswith(f"{package}.")
            or getattr(module, name, None) is not obj
        ):
            continue
        try:
            tree = ast.parse(inspect.getsource(module))
        except (OSError, TypeError):
            continue
        body = tree.body
        for i, node in enumerate(body):
            if not (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.target.id == name
                and node.value is not None
                and ast.unparse(node.annotation).split(".")[-1] == "TypeAlias"
            ):
                continue
            doc = body[i + 1] if i + 1 < len(body) else None
            lines = []
            if (
                isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
            ):
                lines = prepare_docstring(doc.value.value)
            return modname, ast.unparse(node.value), lines
    return None


class AutoTypeAlias(SphinxDirective):
    """``.. autotypealias:: Name``: a type alias, from its source."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        package = self.env.ref_context.get("py:module") or PACKAGE
        found = _alias_source(package, name)
        if found is None:
            raise self.error(f"{package}.{name} is not a `Name: TypeAlias = ...`.")
        modname, value, doc = found
        if not doc:
            raise self.error(f"{modname}.{name} has no docstring under it.")
        # The docstring goes through napoleon like every other docstring
        # ("type": "data" would read "A pytree of axes: ..." as a type).
        obj = getattr(importlib.import_module(package), name)
        self.env.app.emit(
            "autodoc-process-docstring", "type", f"{package}.{name}", obj, {}, doc
        )
        if sphinx.version_info >= (7, 4):
            head = [f".. py:type:: {name}", f"   :canonical: {value}"]
        else:  # no py:type before Sphinx 7.4
            head = [f".. py:data:: {name}", f"   :annotation: = {value}"]
        source = self.get_source_info()[0]
        text = StringList()
        for line in [*head, "", *(f"   {d}" if d else "" for d in doc)]:
            text.append(line, source)
        container = nodes.container()
        self.state.nested_parse(text, self.content_offset, container)
        return container.children


def _clean(annotation: str | None) -> str | None:
    if annotation is None:
        return None
    return _ANY_ARGS.sub("Callable[...,", _FORWARD_REF.sub(r"\1", annotation))


def _fix_signature(app, what, name, obj, options, signature, return_annotation):
    del app, name, obj, options
    if what == "class":
        return "", None  # shown by name: their constructors are not public
    return _clean(signature), _clean(return_annotation)


def _public_bases(app, name, obj, options, bases: list[Any]) -> None:
    del app, name, obj, options
    package = importlib.import_module(PACKAGE)
    for i, base in enumerate(bases):
        module = getattr(base, "__module__", "")
        public = getattr(package, getattr(base, "__name__", ""), None) is base
        if module.startswith(f"{PACKAGE}._") and public:
            bases[i] = f":py:class:`{PACKAGE}.{base.__name__}`"  # rst, kept as is


def _alias_as_data(app, env, node, contnode):
    """Before Sphinx 7.4 an alias is ``py:data``; signatures refer to classes."""
    if node.get("refdomain") != "py" or node.get("reftype") != "class":
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, "obj", node["reftarget"], node, contnode
    )


def setup(app) -> dict[str, Any]:
    app.add_directive("autotypealias", AutoTypeAlias)
    app.connect("autodoc-process-signature", _fix_signature)
    app.connect("autodoc-process-bases", _public_bases)
    if sphinx.version_info < (7, 4):
        app.connect("missing-reference", _alias_as_data)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
