"""benchmarks.models: the shared CNN and the real models' parameter shapes."""

import math

import jax
import jax.numpy as jnp
import pytest

import optax_gc
from benchmarks import models
from optax_gc._axes import path_str


def test_real_tree_shapes():
    resnet = models.resnet50_shapes()
    assert len(resnet) == 161
    assert abs(sum(math.prod(s) for s in resnet.values()) - 25.557e6) < 0.01e6
    gpt2 = models.gpt2_small_shapes()
    assert abs(sum(math.prod(s) for s in gpt2.values()) - 124.4e6) < 0.1e6


@pytest.mark.parametrize("size, stem_stride", [(8, 1), (28, 2)])
def test_cnn_logits_shape(size, stem_stride):
    model = models.CNN(width=4, stem_stride=stem_stride)
    x = jnp.zeros((2, size, size, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    assert set(variables) == {"params", "batch_stats"}
    assert model.apply(variables, x, train=False).shape == (2, 10)


def test_gpt2_module_has_the_gpt2_tree_and_inference_agrees_with_the_rules():
    model = models.GPT2()  # GPT-2 small, abstractly: nothing is allocated
    tokens = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = {path_str(p): tuple(x.shape) for p, x in flat}
    assert shapes == models.gpt2_small_shapes()
    rule = optax_gc.infer_output_axes(
        lambda p, t: model.apply({"params": p}, t), params, tokens
    )
    inferred = optax_gc.explain(params, output_axes=rule)
    by_hand = optax_gc.explain(params, output_axes=models.GPT2_RULES)
    assert [r.kept for r in inferred] == [r.kept for r in by_hand]
    assert inferred["wte/embedding"].why == "tied lookup and matmul"
    # Looked up at arange(T): a data-independent index, then added to data.
    assert inferred["wpe/embedding"].why == "elementwise only (add)"
