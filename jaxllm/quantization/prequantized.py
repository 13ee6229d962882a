"""Checkpoints that arrive quantized (GPTQ, AWQ, compressed-tensors, fp8): which scheme of ``schemes`` a
checkpoint's ``quantization_config`` maps onto, and each linear layer's stored tensors turned into that scheme's
``values`` and ``scales`` (and zero-point ``offsets``) with no second rounding: the weights the matmul sees are the
checkpoint's, bit for bit (block-scaled fp8 excepted, below).

=========================================== ========================================================== ========
``quantization_config``                     stored per linear layer (``W [K, N]``, torch's ``[N, K]``)  scheme
=========================================== ========================================================== ========
``gptq``: bits 4 (``sym`` or not)           ``qweight`` int32 ``[K/8, N]``, ``scales`` f16 ``[K/g, N]``, int4
                                            ``qzeros`` int32 ``[K/g, N/8]``, ``g_idx``
``awq``: bits 4, ``version`` gemm           ``qweight`` int32 ``[K, N/8]`` (interleaved), ``qzeros``    int4
                                            ``[K/g, N/8]``, ``scales`` f16 ``[K/g, N]``
``compressed-tensors``: int 4, group,       ``weight_packed`` int32 ``[N, K/8]``, ``weight_scale``      int4
``pack-quantized``                          ``[N, K/g]``, ``weight_zero_point`` (asymmetric), ``weight_shape``
``compressed-tensors``: int 8, channel or   ``weight`` int8 ``[N, K]`` (or ``weight_packed`` int32       int8
tensor, symmetric                           ``[N, K/4]``), ``weight_scale`` ``[N, 1]`` / ``[1]``
``compressed-tensors``: float 8, channel    ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale``        fp8
or tensor                                   ``[N, 1]`` / ``[1]``, ``input_scale``
``fp8`` without ``weight_block_size``       ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` ``[]``, fp8
                                            ``input_scale``
``fp8`` with ``weight_block_size`` [r, c]   ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale_inv``      fp8, re-
                                            ``[N/r, K/c]``                                             rounded
=========================================== ========================================================== ========

Packed ints hold ``32 / bits`` values per int32, value ``i`` at bits ``[bits * i, bits * (i + 1))`` (AWQ interleaves
each word's eight columns), unsigned: the signed value plus ``2 ** (bits - 1)``, or a code whose zero point is stored
beside it (GPTQ's v1 format stores zero points minus one). Zero points become ``QuantizationConfig.zero_points``'
per-group offsets, ``(8 - zero) * scale``, so ``W = (code - 8) * scale + offset`` (``jaxllm.models.layers``). What
jaxllm computes differently from the checkpoint's own runtime: activations are never quantized by a stored
``input_scale`` (the fp8 scheme scales each token's activations itself; int8 is weight-only here, so a W8A8
checkpoint runs as W8A16); block-scaled fp8 (``weight_block_size``, e.g. Qwen3's and DeepSeek's FP8 checkpoints) is
rounded to e4m3 a second time, at one scale per output row, since the fp8 scheme has no block scales.

Refused, with a ``ValueError`` naming the setting: other bit widths, zero points outside int4, activation order (a
``g_idx`` other than ``k // g``), per-channel int4, per-module overrides and several compressed-tensors groups.
Imports no kernels.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxllm.quantization.schemes import (
    INT4_OFFSET,
    QuantizedWeight,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    validate_quantized_weight,
)

SUPPORTED = "gptq / awq (4-bit), compressed-tensors (int4 group, symmetric int8 / fp8) or fp8 (per tensor or block)"


@dataclasses.dataclass(frozen=True)
class StoredFormat:
    """How one linear layer's quantized weight is stored: the tensors that must arrive (``required``), those checked
    alone as they arrive (``optional``), and the conversion to a scheme."""

    # "gptq" | "awq" | "packed" (compressed-tensors pack-quantized) | "plain" (int8 / fp8 stored as is)
    layout: str
    method: str  # jaxllm's scheme: int4 | int8 | fp8
    group_size: int | None = None  # int4
    zero_points: bool = False  # int4 stored with zero points (read as offsets; QuantizationConfig.zero_points)
    gptq_zero_offset: int = 1  # GPTQ's v1 format stores zero points minus one; gptq_v2 as they are
    # fp8 with one scale per block of [rows, columns] of torch's [N, K] (``weight_scale_inv``): re-quantized per row
    fp8_block: tuple[int, int] | None = None

    @property
    def required(self) -> tuple[str, ...]:
        if self.layout in ("gptq", "awq"):
            return ("qweight", "scales", "qzeros") if self.zero_points else ("qweight", "scales")
        if self.fp8_block is not None:
            return ("weight", "weight_scale_inv")
        first = "weight_packed" if self.layout == "packed" else "weight"
        return (first, "weight_scale", "weight_zero_point") if self.zero_points else (first, "weight_scale")

    @property
    def optional(self) -> tuple[str, ...]:
        if self.layout in ("gptq", "awq"):
            return ("g_idx",) if self.zero_points else ("qzeros", "g_idx")
        pieces = ("weight_shape", "weight_g_idx", "weight_zero_point", "input_scale")
        return tuple(p for p in pieces if p not in self.required)

    def owns(self, suffix: str, array: np.ndarray) -> bool:
        """Whether a tensor ``<layer>.<suffix>`` is a stored piece of a quantized weight (a plain format's
        ``weight`` only when it holds the stored dtype: an unquantized layer's float ``weight`` is not)."""
        if suffix == "weight" and self.layout == "plain":
            return array.dtype == _STORED_DTYPES[self.method]
        return suffix in self.required or suffix in self.optional

    def check_optional(self, name: str, suffix: str, array: np.ndarray, shape: tuple[int, int]) -> None:
        """ValueError unless an optional piece agrees with an in-order weight of ``shape`` ``(K, N)`` (and, for a
        format without zero points, a symmetric one)."""
        k, n = shape
        if suffix == "qzeros":
            if np.any(self._gptq_zeros(array) != INT4_OFFSET):
                raise ValueError(f"{name} holds zero points other than {INT4_OFFSET} (an asymmetric GPTQ weight)")
        elif suffix in ("g_idx", "weight_g_idx"):
            if not np.array_equal(np.asarray(array), np.arange(k) // self.group_size):
                raise ValueError(f"{name} orders the groups by activation (act-order); only k // group_size is read")
        elif suffix == "weight_shape":
            if tuple(int(d) for d in np.asarray(array).reshape(-1)) != (n, k):
                raise ValueError(f"{name} is {np.asarray(array).tolist()}, the model's layer is [{n}, {k}]")
        elif suffix == "weight_zero_point":
            if np.any(np.asarray(array) != 0):
                raise ValueError(f"{name} holds zero points, but the config says symmetric")

    def _gptq_zeros(self, qzeros: np.ndarray) -> np.ndarray:
        """GPTQ's zero points ``[K/g, N]`` (int32) from ``qzeros [K/g, N/8]``."""
        return _unpack_int32(qzeros, 4, axis=1).astype(np.int32) + self.gptq_zero_offset

    def to_scheme(self, name: str, parts: dict[str, np.ndarray], shape: tuple[int, int]):
        """``(QuantizedWeight, offsets)`` of the layer ``name`` whose required pieces are ``parts``; ``offsets``
        (``[K/g, N]`` float32, ``(8 - zero) * scale``) for a format with zero points, else None."""
        k, n = shape
        zeros = None  # [K/g, N], in the codes' unsigned range (8 = none)
        if self.layout in ("gptq", "awq"):
            if self.layout == "gptq":
                codes = _unpack_int32(parts["qweight"], 4, axis=0)  # [K, N], unsigned
                zeros = self._gptq_zeros(parts["qzeros"]) if self.zero_points else None
            else:
                codes = _awq_order(_unpack_int32(parts["qweight"], 4, axis=1))
                zeros = _awq_order(_unpack_int32(parts["qzeros"], 4, axis=1)).astype(np.int32)
            values, scales = pack_int4(codes, self.group_size), parts["scales"]
        elif self.layout == "packed" and self.method == "int4":
            codes = _unpack_int32(parts["weight_packed"], 4, axis=1)  # [N, K], signed + 8
            values, scales = pack_int4(codes[:, :k].T, self.group_size), parts["weight_scale"].T
            if self.zero_points:  # signed zero points + 8, packed along N
                zeros = _unpack_int32(parts["weight_zero_point"], 4, axis=0)[:n].T.astype(np.int32)
        elif self.fp8_block is not None:
            return _requantized_fp8_blocks(name, parts, shape, self.fp8_block), None
        else:
            stored = parts.get("weight")
            if stored is None:  # int8 packed four to an int32, stored as signed + 128
                stored = _unpack_int32(parts["weight_packed"], 8, axis=1)[:, :k].astype(np.int16) - 128
            values = stored.astype(_STORED_DTYPES[self.method])  # [N, K]
            values = values if self.method == "fp8" else values.T  # fp8 is stored [N, K] by jaxllm too
            scales = np.broadcast_to(np.asarray(parts["weight_scale"], np.float32).reshape(-1), (n,))
        scales = np.ascontiguousarray(np.asarray(scales, np.float32))
        qw = QuantizedWeight(jnp.asarray(values), jnp.asarray(scales), self.method, self.group_size, (k, n))
        try:
            validate_quantized_weight(qw)
            if zeros is not None and zeros.shape != scales.shape:
                raise ValueError(f"zero points {list(zeros.shape)} against scales {list(scales.shape)}")
        except ValueError as error:
            raise ValueError(f"{name}: its stored tensors do not make a {shape} weight ({error})") from None
        offsets = None if zeros is None else (INT4_OFFSET - zeros).astype(np.float32) * scales
        return qw, offsets


def _requantized_fp8_blocks(name: str, parts, shape: tuple[int, int], block: tuple[int, int]) -> QuantizedWeight:
    """A block-scaled fp8 weight (``W[n, k] = weight[n, k] * weight_scale_inv[n // rows, k // columns]``) as
    jaxllm's fp8 scheme, one scale per output row: dequantized to float32 and rounded to e4m3 again, which moves each
    value by at most half an e4m3 step at its row's scale."""
    k, n = shape
    rows, columns = block
    scales = np.asarray(parts["weight_scale_inv"], np.float32)
    if parts["weight"].shape != (n, k):
        raise ValueError(f"{name}.weight has shape {list(parts['weight'].shape)}, the model's layer is [{n}, {k}]")
    if scales.shape != (-(-n // rows), -(-k // columns)):
        raise ValueError(
            f"{name}.weight_scale_inv has shape {list(scales.shape)}, blocks of {block} of [{n}, {k}] need "
            f"[{-(-n // rows)}, {-(-k // columns)}]"
        )
    expanded = np.repeat(np.repeat(scales, rows, axis=0)[:n], columns, axis=1)[:, :k]  # [N, K]
    weight = parts["weight"].astype(np.float32) * expanded  # [N, K]
    return quantize_weight(jnp.asarray(weight.T), "fp8")


_STORED_DTYPES = {"int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    """A checkpoint's ``quantization_config``, resolved: its name, how its layers are stored, and whether its
    lm_head is quantized too."""

    quant_method: str
    stored: StoredFormat
    lm_head: bool

    @property
    def method(self) -> str:
        return self.stored.method

    @property
    def group_size(self) -> int | None:
        return self.stored.group_size

    @property
    def zero_points(self) -> bool:
        return self.stored.zero_points


def checkpoint_quantization(hf_config: dict) -> CheckpointQuantization | None:
    """The resolved ``quantization_config`` of a checkpoint's config.json (None: not quantized); a ValueError naming
    the setting for a checkpoint jaxllm cannot read as stored."""
    config = hf_config.get("quantization_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"config.json's quantization_config must be an object, got {config!r}")
    method = config.get("quant_method")
    if method == "gptq":
        return _gptq(config)
    if method == "awq":
        return _awq(config)
    if method == "compressed-tensors":
        return _compressed_tensors(config)
    if method == "fp8":
        return _fp8(config)
    raise ValueError(
        f"config.json's quantization_config.quant_method={method!r} is not supported; jaxllm reads {SUPPORTED}, "
        "or quantizes an unquantized checkpoint itself (LLM(quantization='int8' | 'int4' | 'fp8'))"
    )


def _refuse(setting: str, value, why: str):
    return ValueError(f"quantization_config.{setting}={value!r} is not supported: {why}; jaxllm reads {SUPPORTED}")


def _gptq(config: dict) -> CheckpointQuantization:
    if config.get("bits") != 4:
        raise _refuse("bits", config.get("bits"), "GPTQ weights are read at 4 bits only")
    if not isinstance(config.get("sym", True), bool):
        raise _refuse("sym", config.get("sym"), "it must be true or false")
    if config.get("dynamic"):
        raise _refuse("dynamic", config.get("dynamic"), "per-module GPTQ settings are not read")
    group_size = _group_size(config.get("group_size"), "group_size")
    checkpoint_format = config.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise _refuse("checkpoint_format", checkpoint_format, "GPTQ's gptq and gptq_v2 formats are read")
    offset = 1 if checkpoint_format == "gptq" else 0
    zero_points = not config.get("sym", True)
    stored = StoredFormat("gptq", "int4", group_size, zero_points=zero_points, gptq_zero_offset=offset)
    return CheckpointQuantization("gptq", stored, lm_head=bool(config.get("lm_head", False)))


def _awq(config: dict) -> CheckpointQuantization:
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4:
        raise _refuse("bits", bits, "AWQ weights are read at 4 bits only")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse("version", config.get("version"), "AWQ's GEMM layout is read (qweight [K, N/8])")
    if config.get("zero_point", True) is not True:
        raise _refuse("zero_point", config.get("zero_point"), "AWQ's GEMM layout stores zero points")
    group_size = _group_size(config.get("group_size", config.get("q_group_size")), "group_size")
    stored = StoredFormat("awq", "int4", group_size, zero_points=True)
    return CheckpointQuantization("awq", stored, lm_head=False)  # AutoAWQ leaves lm_head unquantized


def _compressed_tensors(config: dict) -> CheckpointQuantization:
    groups = config.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse("config_groups", sorted(groups), "one quantization scheme for all linear layers is read")
    (group,) = groups.values()
    if "Linear" not in (group.get("targets") or []):
        raise _refuse("config_groups.targets", group.get("targets"), "the scheme must target every Linear layer")
    if config.get("quantization_status", "compressed") != "compressed":
        raise _refuse("quantization_status", config.get("quantization_status"), "compressed weights are read")
    sparsity = config.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise _refuse("sparsity_config.format", sparsity.get("format"), "sparse weights are not read")
    weights = group.get("weights") or {}
    layout_name = group.get("format") or config.get("format")
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    symmetric = weights.get("symmetric", True)
    int4_group = kind == "int" and bits == 4 and strategy == "group" and layout_name == "pack-quantized"
    if symmetric is not True and not int4_group:
        raise _refuse("weights.symmetric", symmetric, "zero points are read for int4 groups only")
    if int4_group:
        if weights.get("actorder") not in (None, "static"):
            raise _refuse("weights.actorder", weights.get("actorder"), "groups are read in order (k // group_size)")
        group_size = _group_size(weights.get("group_size"), "weights.group_size")
        stored = StoredFormat("packed", "int4", group_size, zero_points=symmetric is not True)
    elif kind == "int" and bits == 8 and strategy in ("channel", "tensor"):
        layout = "packed" if layout_name == "pack-quantized" else "plain"
        stored = StoredFormat(layout, "int8")
    elif kind == "float" and bits == 8 and strategy in ("channel", "tensor"):
        stored = StoredFormat("plain", "fp8")
    else:
        raise _refuse(
            "config_groups weights",
            {"num_bits": bits, "type": kind, "strategy": strategy, "format": layout_name},
            "this combination has no jaxllm scheme",
        )
    lm_head = not any(_names_lm_head(entry) for entry in config.get("ignore") or [])
    return CheckpointQuantization("compressed-tensors", stored, lm_head=lm_head)


def _fp8(config: dict) -> CheckpointQuantization:
    block = config.get("weight_block_size")
    if block is not None and not (
        isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise _refuse("weight_block_size", block, "it must be [rows, columns] of positive ints")
    ignored = list(config.get("ignored_layers") or []) + list(config.get("modules_to_not_convert") or [])
    lm_head = bool(ignored) and not any(_names_lm_head(entry) for entry in ignored)
    stored = StoredFormat("plain", "fp8", fp8_block=None if block is None else tuple(block))
    return CheckpointQuantization("fp8", stored, lm_head=lm_head)


def _names_lm_head(entry: str) -> bool:
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], "lm_head") is not None
    return entry == "lm_head" or entry.endswith(".lm_head")


def _group_size(value, setting: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
        raise _refuse(setting, value, "int4 needs a positive even group size (per-channel -1 is not read)")
    return value


# AWQ packs eight columns to an int32 interleaved: column j of each word sits at nibble _AWQ_NIBBLE_OF_COLUMN[j]
_AWQ_NIBBLE_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)


def _awq_order(nibbles: np.ndarray) -> np.ndarray:
    """Columns in order from AWQ's unpacked nibbles ``[rows, N]`` (each word's eight in nibble order)."""
    rows, n = nibbles.shape
    return nibbles.reshape(rows, n // 8, 8)[:, :, list(_AWQ_NIBBLE_OF_COLUMN)].reshape(rows, n)


def _unpack_int32(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned ``bits``-wide values (uint8) from int32 words along ``axis``: value ``i`` of each word at bits
    ``[bits * i, bits * (i + 1))``, so the axis grows ``32 / bits`` times."""
    words = np.moveaxis(np.asarray(packed).view(np.uint32), axis, -1)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    values = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # [..., words, 32 / bits]
    values = values.reshape(*words.shape[:-1], -1).astype(np.uint8)
    return np.moveaxis(values, -1, axis)


class StoredLayers:
    """Collects each quantized layer's stored tensors as they arrive, one layer at a time, and hands over a layer's
    ``QuantizedWeight`` once its required tensors are in."""

    def __init__(self, checkpoint: CheckpointQuantization):
        self.stored = checkpoint.stored
        self._parts: dict[str, dict[str, np.ndarray]] = {}
        self._done: set[str] = set()

    def owns(self, name: str, array: np.ndarray) -> bool:
        suffix = name.rpartition(".")[2]
        return "." in name and self.stored.owns(suffix, array)

    def add(self, name: str, array: np.ndarray, shape: tuple[int, int]):
        """Stores one piece of layer ``<layer>.<suffix>`` (``shape`` its weight's ``(K, N)``); returns ``(layer,
        weight, offsets)`` (``StoredFormat.to_scheme``'s) when it completes the layer's required pieces."""
        layer, _, suffix = name.rpartition(".")
        if suffix in self.stored.optional:
            self.stored.check_optional(name, suffix, array, shape)
            return None
        parts = self._parts.setdefault(layer, {})
        if suffix in parts or layer in self._done:
            raise ValueError(f"tensor {name!r} appears twice in the checkpoint")
        parts[suffix] = np.asarray(array)
        if len(parts) < len(self.stored.required):
            return None
        del self._parts[layer]
        self._done.add(layer)
        return (layer, *self.stored.to_scheme(layer, parts, shape))

    def missing(self) -> list[str]:
        """Pieces of layers that got some but not all."""
        return [
            f"{layer}.{suffix}"
            for layer, parts in self._parts.items()
            for suffix in self.stored.required
            if suffix not in parts
        ]


def dequantized(qw: QuantizedWeight, offsets, dtype) -> np.ndarray:
    """``qw``'s weight ``[K, N]`` (plus its zero-point ``offsets``, if any) in ``dtype``: for a layer the model keeps
    unquantized that the checkpoint stores quantized (e.g. a quantized lm_head with ``quantize_lm_head`` off)."""
    weight = np.asarray(dequantize_weight(qw, jnp.float32))
    if offsets is not None:
        weight = weight + np.repeat(offsets, qw.group_size, axis=0)
    return weight.astype(dtype)
