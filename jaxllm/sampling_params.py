"""SamplingParams: how one request's tokens are chosen and when its generation stops; with it vLLM's
``StructuredOutputsParams`` (a grammar the output follows) and ``BeamSearchParams`` (``LLM.beam_search``).

Mirrors vLLM's classes by name and default. Owns validation of user input (every bad value raises
``ValueError``/``TypeError`` naming the field and the value). Plain Python: imports neither jax nor flax.
"""

from __future__ import annotations

import dataclasses
import enum
import json as _json
import math
import numbers
from collections.abc import Sequence
from typing import Any

from jaxllm.argument_checks import number_error

# Sampling treats a temperature below this as greedy (vLLM does the same).
GREEDY_TEMPERATURE_EPS = 1e-5


# The numeric fields; numpy's scalars are taken for them (and inside the token-id lists) as the Python value they hold.
NUMERIC_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "min_tokens",
    "truncate_prompt_tokens",
    "logprobs",
    "prompt_logprobs",
)


def _plain_number(value):
    """A numpy scalar (``np.int64(5)``, ``np.float32(0.7)``) as the Python int or float it holds; anything else
    (bools, numpy's included, and non-numbers) unchanged, for the checks to judge."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool | int | float | complex):
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
    return value


def _finite_number_error(value, types=(int, float)) -> type[Exception] | None:
    """TypeError unless ``value`` is one of ``types`` (never a bool), ValueError if not finite, None when valid."""
    if isinstance(value, bool) or not isinstance(value, types):
        return TypeError
    return None if math.isfinite(value) else ValueError


def _check_number(name: str, value, *, types=(int, float)) -> None:
    if (error := _finite_number_error(value, types)) is TypeError:
        raise TypeError(f"SamplingParams.{name} must be a number, got {value!r} ({type(value).__name__})")
    if error is ValueError:
        raise ValueError(f"SamplingParams.{name} must be finite, got {value!r}")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SamplingParams.{name} must be an int, got {value!r} ({type(value).__name__})")


def _check_token_id(what: str, value) -> None:
    """A list element that must be a token id: TypeError unless an int, ValueError if negative (``what``: the rule)."""
    if (error := number_error(value, minimum=0)) is not None:
        raise error(f"{what}, got {value!r}")


def _check_string(what: str, value, *, blank_ok: bool) -> None:
    """A list element that must be a non-empty string (non-blank too unless ``blank_ok``)."""
    if not isinstance(value, str):
        raise TypeError(f"{what}, got {value!r}")
    if not (value if blank_ok else value.strip()):
        raise ValueError(f"{what}, got {value!r}")


def _as_list(name: str, value) -> list:
    """``value`` (None, a list or a tuple) as a new list; TypeError naming the field and the value otherwise."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"SamplingParams.{name} must be a list, got {value!r}")
    return [_plain_number(item) for item in value]


class RequestOutputKind(enum.Enum):
    """vLLM's ``SamplingParams.output_kind``: what ``LLMEngine.step()`` returns for a request while it runs.
    CUMULATIVE (the default): its whole output so far whenever it gains tokens; DELTA: only what is new since its last
    output; FINAL_ONLY: one output, when it finishes (``LLM.generate`` always uses this)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's structured outputs: exactly one of ``json`` (a JSON schema, as a dict or its JSON text), ``regex``,
    ``choice`` (the output is one of these strings), ``grammar`` (Lark or GBNF) or ``json_object=True`` (any JSON
    object). ``disable_any_whitespace``: JSON without whitespace between its tokens (by default any is allowed, as in
    vLLM). ``GuidedDecodingParams`` is the same class under vLLM's older name."""

    json: dict | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [kind for kind in STRUCTURED_OUTPUT_KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"StructuredOutputsParams takes exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}, got "
                f"{given or 'none'}"
            )
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    _json.loads(self.json)
                except ValueError as error:
                    raise ValueError(
                        f"StructuredOutputsParams.json is not valid JSON ({error}): {self.json!r}"
                    ) from None
            elif not isinstance(self.json, dict):
                raise TypeError(f"StructuredOutputsParams.json must be a dict or a JSON string, got {self.json!r}")
            else:
                try:
                    _json.dumps(self.json)
                except (TypeError, ValueError) as error:
                    raise TypeError(f"StructuredOutputsParams.json is not JSON-serialisable ({error})") from None
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"StructuredOutputsParams.{kind} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise ValueError(
                    f"StructuredOutputsParams.choice must be a non-empty list of strings, got {self.choice!r}"
                )
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"StructuredOutputsParams.choice must hold non-empty strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        for flag in ("json_object", "disable_any_whitespace"):
            value = getattr(self, flag)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"StructuredOutputsParams.{flag} must be a bool, got {value!r}")

    @property
    def kind(self) -> str:
        return next(kind for kind in STRUCTURED_OUTPUT_KINDS if getattr(self, kind) not in (None, False))

    def grammar_spec(self) -> tuple[str, str]:
        """``(format, text)``: a JSON schema (``"json"``, or ``"json_compact"`` without free whitespace; as sorted JSON
        text), or a regex, a choice list (JSON text) or a grammar as given; equal specs compile to the same grammar."""
        kind = self.kind
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else self.json
            schema = _json.loads(schema) if isinstance(schema, str) else schema
            return ("json_compact" if self.disable_any_whitespace else "json"), _json.dumps(schema, sort_keys=True)
        if kind == "choice":
            return "choice", _json.dumps(list(self.choice))
        return kind, getattr(self, kind)  # regex, grammar


GuidedDecodingParams = StructuredOutputsParams  # vLLM's earlier name


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """``LLM.beam_search``'s parameters (``jaxllm.beam_search``), vLLM's: ``beam_width`` beams kept per prompt, at
    most ``max_tokens`` new tokens each; a beam ends at EOS unless ``ignore_eos``. Each round also samples one token
    per beam at ``temperature`` (0: the best one), which joins its candidates; logprobs are the model's raw ones."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # vLLM's field; EOS never shows in the text

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if (error := number_error(value, minimum=1)) is not None:
                raise error(f"BeamSearchParams.{name} must be an int of at least 1, got {value!r}")
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if (error := _finite_number_error(value)) is not None:
                raise error(f"BeamSearchParams.{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"BeamSearchParams.temperature must be non-negative, got {self.temperature}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"BeamSearchParams.{name} must be a bool, got {getattr(self, name)!r}")


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top logprobs per output token; -1: the whole vocabulary (the engine resolves it)
    prompt_logprobs: int | None = None  # the same per prompt token
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    allowed_token_ids: list[int] | None = None  # sample only among these
    bad_words: list[str] | None = None  # words never generated (jaxllm.bad_words)
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (-1: max_model_len - 1)
    detokenize: bool = True  # False: token ids only, text ""
    skip_special_tokens: bool = True
    # vLLM's; it only changes tokenizers whose decode takes it (slow ones), and transformers 5 loads fast ones only
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # what LLMEngine.step() returns while running
    extra_args: dict[str, Any] | None = None  # vLLM's free-form extras for plugins; carried, never read by jaxllm
    structured_outputs: StructuredOutputsParams | None = None  # the output follows a grammar (jaxllm.structured_output)
    guided_decoding: StructuredOutputsParams | None = None  # vLLM's earlier name: moved into structured_outputs

    def __post_init__(self) -> None:
        for name in NUMERIC_FIELDS:
            setattr(self, name, _plain_number(getattr(self, name)))
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError(
                    "SamplingParams takes structured_outputs or guided_decoding (its earlier name), not both: got "
                    f"{self.structured_outputs!r} and {self.guided_decoding!r}"
                )
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise TypeError(
                f"SamplingParams.structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}"
            )
        self.stop = [self.stop] if isinstance(self.stop, str) else _as_list("stop", self.stop)
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _as_list("allowed_token_ids", self.allowed_token_ids)
        if self.bad_words is not None:
            self.bad_words = _as_list("bad_words", self.bad_words)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise TypeError(
                    f"SamplingParams.logit_bias must be a dict of token id to bias, got {self.logit_bias!r}"
                )
            self.logit_bias = {_plain_number(t): _plain_number(bias) for t, bias in self.logit_bias.items()}
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be at least 1, got {self.n}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            _check_number(name, getattr(self, name))
        if self.temperature < 0.0:
            raise ValueError(f"SamplingParams.temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 or 0 (off) or a positive int, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"SamplingParams.presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"SamplingParams.frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"SamplingParams.repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not -(2**63) <= self.seed < 2**64:
                raise ValueError(f"SamplingParams.seed must fit in 64 bits, in [-2**63, 2**64), got {self.seed}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"SamplingParams.max_tokens must be at least 1, got {self.max_tokens}")
        _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"SamplingParams.min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        self._validate_stops()
        self._validate_token_lists()
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens)
            if self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1:
                raise ValueError(
                    "SamplingParams.truncate_prompt_tokens must be at least 1, or -1 (what max_model_len allows), "
                    f"got {self.truncate_prompt_tokens}"
                )
        bools = ("ignore_eos", "include_stop_str_in_output", "detokenize", "skip_special_tokens")
        for name in (*bools, "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SamplingParams.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError(f"SamplingParams.output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise TypeError(f"SamplingParams.extra_args must be a dict or None, got {self.extra_args!r}")
        if not self.detokenize and self.stop:
            raise ValueError(f"SamplingParams.stop={self.stop!r} needs detokenize=True (stop strings match the text)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value)
                if value < -1:
                    raise ValueError(f"SamplingParams.{name} must be non-negative, or -1 for every token, got {value}")

    def _validate_token_lists(self) -> None:
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("SamplingParams.allowed_token_ids must not be empty (None allows every token)")
            for t in self.allowed_token_ids:
                _check_token_id("SamplingParams.allowed_token_ids must hold non-negative ints", t)
        for word in self.bad_words or ():
            _check_string("SamplingParams.bad_words must hold non-blank strings", word, blank_ok=False)
        for t, bias in (self.logit_bias or {}).items():
            _check_token_id("SamplingParams.logit_bias keys must be non-negative token ids", t)
            if (error := _finite_number_error(bias)) is not None:
                raise error(f"SamplingParams.logit_bias[{t}] must be a finite number, got {bias!r}")

    def _validate_stops(self) -> None:
        for s in self.stop:
            _check_string("SamplingParams.stop must hold non-empty strings", s, blank_ok=True)
        for t in self.stop_token_ids:
            _check_token_id("SamplingParams.stop_token_ids must hold non-negative ints", t)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def clone(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def expand_sampling_params(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
) -> list[SamplingParams]:
    """One SamplingParams per prompt, from None (defaults), one shared value, or a list of the right length."""
    if sampling_params is None:
        return [SamplingParams() for _ in range(num_prompts)]
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    if not isinstance(sampling_params, list | tuple):
        raise TypeError(
            f"sampling_params must be SamplingParams or a list of them (one per prompt), got "
            f"{type(sampling_params).__name__}: {sampling_params!r}"
        )
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts; pass one or one per prompt")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
    return params
