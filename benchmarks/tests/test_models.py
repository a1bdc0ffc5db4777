"""benchmarks.models: the shared CNN and the real models' parameter shapes."""

import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import models


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
