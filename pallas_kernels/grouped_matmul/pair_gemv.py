"""Expert products one (token, expert) pair at a time, for small steps: no tile plan.

At decode a step routes a few tokens, and laying their pairs out in expert tiles (``plan_tiles``: a sort, scatters,
a search, a gather of the rows) costs more device ops than the products themselves. Here pair ``p`` multiplies its
own row by its own expert's weight as a matrix-vector product, reading the row and the expert id where they are:

- ``pair_swiglu(x, expert_ids, w_gate, w_up, ...)``: ``silu(x[p // top_k] @ w_gate[e]) * (x[p // top_k] @ w_up[e])``
  with ``e = expert_ids[p]``, gate and up in one pass over the row (the experts' first half);
- ``pair_matmul(h, expert_ids, w, ...)``: ``h[p] @ w[e]`` in float32 (the down projection, whose sums the caller
  weighs and adds up per token).

Pairs at or past ``num_pairs`` (a step's padding tokens) read no weight and come out as zeros. Each product
accumulates in float32; the SwiGLU's gate and up round to the weights' dtype before the activation (as the tile
path's separate ``Linear``-like products do) and its output is in that dtype. The kernels split K over programs
and return float32 partial sums, added up here (an XLA fusion with the masking and the activation).

Two pairs with the same expert each read its weight, so a step of ``P`` pairs reads up to ``P`` experts' weights
where the tile plan reads the distinct ones; the kernel's grid runs the pairs fastest, so pairs that share an expert
read the same weight columns at about the same time, from L2 after the first. Which steps take this path is the
caller's choice (``jaxllm.models.moe``).

Backends (``impl=``): ``"reference"`` (pure jnp: each pair's weight gathered; any platform, for tests),
``"pallas_gpu"`` (the Pallas Triton kernels in ``pair_gemv_triton``), ``"pallas_gpu_interpret"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.op import DTYPES, IMPLS, MIN_DIM


def _num_pairs_array(num_pairs, total: int) -> jax.Array:
    return jnp.reshape(jnp.asarray(total if num_pairs is None else num_pairs, jnp.int32), (1,))


def _validate(rows, expert_ids, weights, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if expert_ids.ndim != 1:
        raise ValueError(f"expert_ids must be [P] (one per pair), got shape {expert_ids.shape}")
    for w in weights:
        if w.ndim != 3 or w.shape[1] != rows.shape[1]:
            raise ValueError(f"weights must be [E, K, N] with K={rows.shape[1]} (the rows' width), got {w.shape}")
        if impl != "reference" and (w.shape[1] % MIN_DIM or w.shape[2] % MIN_DIM):
            raise ValueError(f"the Pallas kernels need K and N multiples of {MIN_DIM}, got [E, K, N] = {list(w.shape)}")
    for array in (rows, *weights):
        if jnp.dtype(array.dtype).name not in DTYPES:
            raise TypeError(f"operands must have dtype in {DTYPES}, got {array.dtype}")


def pair_swiglu(x, expert_ids, w_gate, w_up, num_pairs=None, *, top_k: int, impl: str = "reference") -> jax.Array:
    """``x [T, K]``, ``expert_ids [P]`` (pair ``p`` is token ``p // top_k``'s), ``w_gate`` / ``w_up [E, K, N]`` ->
    ``[P, N]`` in the weights' dtype; ``num_pairs`` (traced, optional): only the first pairs are real."""
    _validate(x, expert_ids, (w_gate, w_up), impl)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} must have one shape")
    if expert_ids.shape[0] > x.shape[0] * top_k:
        raise ValueError(f"{expert_ids.shape[0]} pairs need {top_k} per token of x's {x.shape[0]} rows")
    count = _num_pairs_array(num_pairs, expert_ids.shape[0])
    gate, up = _products(x, expert_ids, (w_gate, w_up), count, top_k, top_k, impl)
    dtype = w_gate.dtype
    gate, up = gate.astype(dtype).astype(jnp.float32), up.astype(dtype).astype(jnp.float32)
    return _zero_padding(jax.nn.silu(gate) * up, count).astype(dtype)


def pair_matmul(h, expert_ids, w, num_pairs=None, *, top_k: int, impl: str = "reference") -> jax.Array:
    """``h [P, K]``, ``expert_ids [P]`` (``top_k`` pairs per token), ``w [E, K, N]`` -> ``h[p] @ w[expert_ids[p]]``
    as float32 ``[P, N]``; pairs at or past ``num_pairs`` are zeros."""
    _validate(h, expert_ids, (w,), impl)
    if expert_ids.shape[0] != h.shape[0]:
        raise ValueError(f"h has {h.shape[0]} rows but expert_ids names {expert_ids.shape[0]} pairs")
    count = _num_pairs_array(num_pairs, expert_ids.shape[0])
    (out,) = _products(h, expert_ids, (w,), count, 1, top_k, impl)
    return _zero_padding(out, count)


def _products(rows, expert_ids, weights, count, rows_per_token: int, top_k: int, impl: str) -> list[jax.Array]:
    """Each pair's row (``rows[p // rows_per_token]``) times its expert's slice of each weight: float32 ``[P, N]``
    per weight, unspecified for padding pairs."""
    if impl == "reference":
        row_of_pair = rows[jnp.arange(expert_ids.shape[0]) // rows_per_token].astype(weights[0].dtype)
        return [
            jnp.einsum("pk,pkn->pn", row_of_pair, w[expert_ids], preferred_element_type=jnp.float32) for w in weights
        ]
    from pallas_kernels.grouped_matmul import pair_gemv_triton

    partials = pair_gemv_triton.pair_partials_triton(
        rows,
        expert_ids,
        tuple(weights),
        count,
        rows_per_token=rows_per_token,
        top_k=top_k,
        interpret=impl.endswith("_interpret"),
    )
    return [jnp.sum(p, axis=0) for p in partials]


def _zero_padding(out: jax.Array, count: jax.Array) -> jax.Array:
    """Padding pairs' rows as zeros (a ``where``: their unwritten partials may hold anything, NaN included)."""
    return jnp.where((jnp.arange(out.shape[0]) < count[0])[:, None], out, 0)
