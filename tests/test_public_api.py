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


PUBLIC = """AxesLike AxesTree Explanation InferenceWarning InferredAxes LayoutWarning
LeafReport Location OptaxGCWarning OutputAxes OutputAxesFn PathRules PerLeaf
ScheduleFreeWarning UnmatchedPatternWarning centralize centralize_array explain
gc_adam gc_adamw gc_fraction gc_sgd infer_output_axes muon_dimension_numbers
path_rules per_leaf with_gc"""


def test_every_warning_is_an_optax_gc_warning():
    for name in optax_gc.__all__:
        obj = getattr(optax_gc, name)
        if isinstance(obj, type) and issubclass(obj, Warning):
            assert issubclass(obj, optax_gc.OptaxGCWarning), name
            assert issubclass(obj, UserWarning), name


def test_the_exported_names():
    assert sorted(optax_gc.__all__) == sorted(PUBLIC.split())


KEYWORD_ONLY = {"output_axes", "conv_only", "location", "partition_specs", "strict"}


def test_options_are_keyword_only():
    for name in optax_gc.__all__:
        obj = getattr(optax_gc, name)
        if not inspect.isfunction(obj) or name == "centralize_array":
            continue
        params = inspect.signature(obj).parameters
        for param in params.values():
            if param.name in KEYWORD_ONLY or (
                param.name == "weight_decay" and name in ("gc_sgd", "gc_adam")
            ):
                assert param.kind is param.KEYWORD_ONLY, (name, param.name)
    default = inspect.signature(optax_gc.path_rules).parameters["default"]
    assert default.kind is default.KEYWORD_ONLY


def test_version():
    assert isinstance(optax_gc.__version__, str) and optax_gc.__version__
