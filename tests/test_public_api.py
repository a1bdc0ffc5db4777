"""The exported surface of optax_gc."""

import inspect

import optax_gc


def test_all_is_sorted_and_exported():
    assert list(optax_gc.__all__) == sorted(optax_gc.__all__)
    for name in optax_gc.__all__:
        assert hasattr(optax_gc, name), name


def test_public_functions_are_documented_with_examples():
    for name in optax_gc.__all__:
        obj = getattr(optax_gc, name)
        if inspect.isfunction(obj):
            doc = inspect.getdoc(obj) or ""
            assert "Examples:" in doc and ">>>" in doc, name
            assert "2004.01461" in doc or "References" not in doc, name


def test_gc_options_are_keyword_only():
    for name in optax_gc.__all__:
        obj = getattr(optax_gc, name)
        if not inspect.isfunction(obj):
            continue
        for param in inspect.signature(obj).parameters.values():
            if param.name in ("output_axes", "conv_only", "location"):
                if name != "centralize_array":
                    assert param.kind is param.KEYWORD_ONLY, (name, param.name)


def test_version():
    assert isinstance(optax_gc.__version__, str) and optax_gc.__version__
