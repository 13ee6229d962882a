"""Beam search, vLLM's ``LLM.beam_search(prompts, BeamSearchParams(...))``: the most likely continuations.

Owns the search over the engine's ordinary steps: each round every live beam of every prompt is one request of one
token asking for ``2 * beam_width`` logprobs (the prefix cache keeps a beam's earlier tokens, so a round computes
little more than one token per beam); each beam's children are its candidate tokens, a child ending in EOS is
complete, and the ``beam_width`` best children of a prompt live on; a beam at ``max_model_len`` ends there. After
``max_tokens`` rounds (or when no beam is left) the completed and the live beams are ranked together. A beam's
score is its cumulative logprob over its length (prompt included, EOS not) to the power ``length_penalty``. Plain
Python over ``LLM.generate``.
"""

from __future__ import annotations

import dataclasses

from tqdm.auto import tqdm

from jaxllm.engine.prompts import as_prompt_list, tokenize_prompt
from jaxllm.outputs import Logprob
from jaxllm.sampling_params import BeamSearchParams, SamplingParams


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` are the prompt's and the generated ones; ``logprobs`` one dict per generated token (the
    candidates its round saw); ``text`` the generated text (without EOS)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_score(tokens: list[int], cum_logprob: float, eos_token_ids, length_penalty: float) -> float:
    """``cum_logprob / length ** length_penalty``, the length counting the prompt and not a final EOS."""
    length = len(tokens) - (tokens[-1] in eos_token_ids)
    return cum_logprob / length**length_penalty


def beam_search(llm, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """Runs the search for each prompt of ``prompts`` (strings or ``{"prompt_token_ids": [...]}``) on ``llm``;
    ``use_tqdm`` shows the rounds."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
    engine = llm.llm_engine
    if engine.config.logprobs_mode.endswith("logits"):
        raise ValueError(
            f"beam search scores beams by their logprobs; this engine's logprobs_mode="
            f"{engine.config.logprobs_mode!r} returns logits (build the LLM with raw_logprobs or processed_logprobs)"
        )
    max_logprobs = engine.config.max_logprobs
    if max_logprobs != -1 and 2 * params.beam_width > max_logprobs:
        raise ValueError(
            f"beam_width={params.beam_width} needs each round's top {2 * params.beam_width} logprobs, more than the "
            f"engine's max_logprobs={max_logprobs} (LLM(max_logprobs=...) raises the cap; -1 removes it)"
        )
    eos, tokenizer = engine.eos_token_ids, engine.get_tokenizer()
    vocab_size = engine.model_config.vocab_size
    prompt_ids = [tokenize_prompt(p, tokenizer, vocab_size).token_ids for p in as_prompt_list(prompts)]
    max_model_len = engine.resolved.max_model_len
    for index, ids in enumerate(prompt_ids):  # as generate() rejects it, before any round runs
        if len(ids) >= max_model_len:
            raise ValueError(
                f"prompt {index}: {len(ids)} tokens leave no room to generate under max_model_len={max_model_len}"
            )
    round_params = SamplingParams(max_tokens=1, temperature=params.temperature, logprobs=2 * params.beam_width)

    def score(beam: BeamSearchSequence) -> float:
        return beam_score(beam.tokens, beam.cum_logprob, eos, params.length_penalty)

    live = [[BeamSearchSequence(list(ids), [])] for ids in prompt_ids]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompt_ids]
    for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm):
        for index, prompt_beams in enumerate(live):  # a beam at max_model_len ends there, by length
            completed[index] += [b for b in prompt_beams if len(b.tokens) >= max_model_len]
            live[index] = [b for b in prompt_beams if len(b.tokens) < max_model_len]
        beams = [(index, beam) for index, prompt_beams in enumerate(live) for beam in prompt_beams]
        if not beams:
            break
        outputs = llm.generate([{"prompt_token_ids": b.tokens} for _, b in beams], round_params, use_tqdm=False)
        children: list[list[BeamSearchSequence]] = [[] for _ in prompt_ids]
        for (index, beam), output in zip(beams, outputs, strict=True):
            candidates = output.outputs[0].logprobs[0]
            for token, logprob in candidates.items():
                child = BeamSearchSequence(
                    beam.tokens + [token], beam.logprobs + [candidates], beam.cum_logprob + logprob.logprob
                )
                if token in eos and not params.ignore_eos:
                    completed[index].append(child)
                else:
                    children[index].append(child)
        live = [sorted(c, key=score, reverse=True)[: params.beam_width] for c in children]
    results = []
    for prompt_tokens, done, running in zip(prompt_ids, completed, live, strict=True):
        best = sorted(done + running, key=score, reverse=True)[: params.beam_width]
        for beam in best:
            ended = beam.tokens[-1] in eos and not params.ignore_eos
            beam.finish_reason = "stop" if ended else "length"
            generated = beam.tokens[len(prompt_tokens) : len(beam.tokens) - ended]
            beam.text = None if tokenizer is None else tokenizer.decode(generated, skip_special_tokens=True)
        results.append(BeamSearchOutput(best))
    return results
