"""``weakly_bound``: a method called through a weak reference keeps its result, name and signature (``jax.jit``
reads the signature for static and donated arguments), does not keep its object alive, and says so when called
after the object is gone."""

import gc
import inspect
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.weak_methods import weakly_bound


class Scaler:
    def __init__(self, factor: float):
        self.factor = factor
        self.calls = 0
        self.jitted = jax.jit(weakly_bound(self.scale), static_argnums=(1,))  # held by the object it calls

    def scale(self, x, power: int):
        self.calls += 1
        return x * self.factor**power


def test_calls_the_method_with_its_name_and_signature():
    scaler = Scaler(1.5)
    call = weakly_bound(scaler.scale)
    x = np.random.default_rng(0).standard_normal(5).astype(np.float32)
    np.testing.assert_allclose(call(x, 2), x * 2.25, rtol=1e-6)
    assert call.__name__ == "scale" and list(inspect.signature(call).parameters) == ["x", "power"]
    np.testing.assert_allclose(scaler.jitted(jnp.asarray(x), 3), x * 1.5**3, rtol=1e-6)
    assert scaler.calls == 2  # once directly, once traced


def test_the_object_is_freed_without_a_collection():
    scaler = Scaler(2.0)
    scaler.jitted(jnp.ones(3), 1)
    call = weakly_bound(scaler.scale)
    alive = weakref.ref(scaler)
    gc.disable()
    try:
        del scaler
        assert alive() is None
    finally:
        gc.enable()
    with pytest.raises(ReferenceError, match="Scaler.scale"):
        call(np.ones(3), 1)


@pytest.mark.parametrize("not_a_method", [print, lambda x: x, Scaler.scale])
def test_rejects_what_is_not_a_bound_method(not_a_method):
    with pytest.raises(TypeError, match="bound method"):
        weakly_bound(not_a_method)
