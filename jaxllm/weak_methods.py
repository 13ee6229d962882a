"""Methods called through a weak reference to their object.

An engine keeps caches and jitted programs of its own methods (``functools.lru_cache(self._method)``,
``jax.jit(self._method)``). Each holds the bound method, the bound method holds the object, and the object holds the
cache: a reference cycle, so a dropped ``LLM`` keeps its weights and KV cache until Python's next full garbage
collection, which may come late or never. Wrapping the method in ``weakly_bound`` breaks the cycle, so ``del llm``
frees the engine's device memory at once. (Closures that need their object, such as a pipeline's stage programs,
hold a ``weakref.proxy`` of it for the same reason.)
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from types import MethodType


def weakly_bound(method: MethodType) -> Callable:
    """A function that calls ``method`` on its object without keeping the object alive.

    It keeps the method's name and signature (without ``self``), which ``jax.jit`` reads for its static and donated
    arguments. Calling it after the object is gone raises ReferenceError.
    """
    if not isinstance(method, MethodType):
        raise TypeError(f"weakly_bound takes a bound method, got {method!r}")
    function, owner = method.__func__, weakref.ref(method.__self__)

    def call(*args, **kwargs):
        obj = owner()
        if obj is None:
            raise ReferenceError(f"{function.__qualname__} called after its object was freed")
        return function(obj, *args, **kwargs)

    functools.update_wrapper(call, function, updated=())
    call.__signature__ = inspect.signature(method)  # read before __wrapped__ (the unbound function, with self)
    return call
