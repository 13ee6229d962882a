"""build_sampling_metadata / SamplingMetadataBuilder: Requests -> padded per-row arrays, flags and buckets."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxllm.request import Request
from jaxllm.sampling import SamplingMetadataBuilder, build_sampling_metadata, sample
from jaxllm.sampling.metadata import bucket_num_logprobs
from jaxllm.sampling_params import SamplingParams


def make_request(rng, request_id, prompt_len=None, num_outputs=0, eos=(2,), sample_index=0, **params):
    prompt = rng.integers(0, 1000, prompt_len or int(rng.integers(3, 40))).tolist()
    request = Request(request_id, prompt, SamplingParams(**params), frozenset(eos), sample_index=sample_index)
    for token in rng.integers(0, 1000, num_outputs):
        request.append_output_token(int(token))
    return request


def assert_same_metadata(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype, field.name
            np.testing.assert_array_equal(x, y, err_msg=field.name)
        else:
            assert x == y, field.name


def test_rows_carry_each_requests_parameters_and_padding_is_greedy():
    rng = np.random.default_rng(0)
    requests = [
        make_request(rng, "a", num_outputs=3, temperature=0.7, top_k=-1, top_p=0.9, min_p=0.05, seed=-1),
        make_request(rng, "b", num_outputs=0, temperature=0.0, top_k=5, seed=2**40 + 9, sample_index=3),
        make_request(rng, "c", num_outputs=7, temperature=1.2, top_k=50),
    ]
    md = build_sampling_metadata(requests, 5)
    np.testing.assert_array_equal(md.temperature, np.float32([0.7, 0.0, 1.2, 0, 0]))
    np.testing.assert_array_equal(md.top_k, [0, 5, 50, 0, 0])
    np.testing.assert_array_equal(md.top_p, np.float32([0.9, 1, 1, 1, 1]))
    np.testing.assert_array_equal(md.min_p, np.float32([0.05, 0, 0, 0, 0]))
    np.testing.assert_array_equal(md.seeded, [True, True, False, False, False])
    # each seed mod 2**64 as (high, low) words: -1 -> 2**64 - 1, 2**40 + 9 -> (2**8, 9); padding 0
    np.testing.assert_array_equal(md.seed, np.uint32([[2**32 - 1, 2**32 - 1], [2**8, 9], [0, 0], [0, 0], [0, 0]]))
    np.testing.assert_array_equal(md.sample_index, [0, 3, 0, 0, 0])
    np.testing.assert_array_equal(md.output_position, [3, 0, 7, 0, 0])
    np.testing.assert_array_equal(md.repetition_penalty, np.ones(5, np.float32))
    assert md.suppressed_token_ids.shape == (5, 0) and md.prompt_token_ids.shape == (5, 0)
    assert (md.all_greedy, md.any_top_k_top_p, md.any_penalties, md.max_num_logprobs) == (False, True, False, 0)


def test_allowed_ids_and_logit_bias_fill_their_rows_and_cost_nothing_when_unused():
    rng = np.random.default_rng(3)
    plain = [make_request(rng, "p")]
    md = build_sampling_metadata(plain, 3)
    assert md.allowed_token_ids.shape == md.logit_bias_ids.shape == md.logit_bias_values.shape == (3, 0)
    requests = [
        make_request(rng, "a", allowed_token_ids=[7, 3, 11]),
        make_request(rng, "b"),
        make_request(rng, "c", logit_bias={5: -2.5, 9: 1.25}),
    ]
    md = build_sampling_metadata(requests, 4)
    allowed = np.full((4, 8), -1, np.int32)
    allowed[0, :3] = [7, 3, 11]
    np.testing.assert_array_equal(md.allowed_token_ids, allowed)
    bias_ids, bias_values = np.full((4, 8), -1, np.int32), np.zeros((4, 8), np.float32)
    bias_ids[2, :2], bias_values[2, :2] = [5, 9], [-2.5, 1.25]
    np.testing.assert_array_equal(md.logit_bias_ids, bias_ids)
    np.testing.assert_array_equal(md.logit_bias_values, bias_values)


def test_flags_ignore_filters_on_greedy_rows():
    rng = np.random.default_rng(1)
    greedy_with_filters = [make_request(rng, "a", temperature=0.0, top_k=3, top_p=0.5)]
    md = build_sampling_metadata(greedy_with_filters, 2)
    assert md.all_greedy and not md.any_top_k_top_p
    md = build_sampling_metadata([make_request(rng, "b", temperature=0.0, frequency_penalty=0.5)], 2)
    assert md.all_greedy and md.any_penalties


@pytest.mark.parametrize(("logprobs", "bucket"), [(None, 0), (0, 1), (1, 1), (3, 5), (20, 20), (21, 32)])
def test_logprob_buckets(logprobs, bucket):
    assert bucket_num_logprobs(logprobs) == bucket
    rng = np.random.default_rng(2)
    requests = [make_request(rng, "a", logprobs=logprobs), make_request(rng, "b")]
    assert build_sampling_metadata(requests, 4).max_num_logprobs == bucket


def test_min_tokens_suppress_eos_and_stop_ids_until_reached():
    rng = np.random.default_rng(3)
    requests = [
        make_request(rng, "a", num_outputs=1, eos=(2, 9), min_tokens=3, stop_token_ids=[40, 41]),
        make_request(rng, "b", num_outputs=1, eos=(2,), min_tokens=3, ignore_eos=True, stop_token_ids=[5]),
        make_request(rng, "c", num_outputs=3, eos=(2,), min_tokens=3),  # reached: nothing suppressed
        make_request(rng, "d", num_outputs=0, eos=(2,)),
    ]
    md = build_sampling_metadata(requests, 6)
    expected = np.full((6, 8), -1, np.int32)
    expected[0, :4] = [2, 9, 40, 41]
    expected[1, :1] = [5]
    np.testing.assert_array_equal(md.suppressed_token_ids, expected)


def test_penalty_rows_carry_their_token_history():
    rng = np.random.default_rng(4)
    requests = [
        make_request(rng, "a", prompt_len=70, num_outputs=5, repetition_penalty=1.2),
        make_request(rng, "b", prompt_len=10, num_outputs=2),  # no penalties: row stays -1
        make_request(rng, "c", prompt_len=3, num_outputs=0, presence_penalty=0.5),
    ]
    md = build_sampling_metadata(requests, 4)
    assert md.any_penalties and md.prompt_token_ids.shape == (4, 128) and md.output_token_ids.shape == (4, 64)
    for row, request in [(0, requests[0]), (2, requests[2])]:
        np.testing.assert_array_equal(md.prompt_token_ids[row, :70][: request.num_prompt_tokens],
                                      request.prompt_token_ids)  # fmt: skip
        assert (md.prompt_token_ids[row, request.num_prompt_tokens :] == -1).all()
        np.testing.assert_array_equal(md.output_token_ids[row, : request.num_output_tokens],
                                      request.output_token_ids)  # fmt: skip
        assert (md.output_token_ids[row, request.num_output_tokens :] == -1).all()
    assert (md.prompt_token_ids[[1, 3]] == -1).all() and (md.output_token_ids[[1, 3]] == -1).all()


def test_cached_builder_matches_a_fresh_build_every_step():
    rng = np.random.default_rng(5)
    requests = [
        make_request(rng, "a", num_outputs=2, temperature=0.8, repetition_penalty=1.1, min_tokens=4, seed=3),
        make_request(rng, "b", num_outputs=0, temperature=0.0, logprobs=2),
        make_request(rng, "c", num_outputs=30, frequency_penalty=0.3, top_p=0.8),
    ]
    builder = SamplingMetadataBuilder()
    for step in range(40):
        for request in requests:
            request.append_output_token(int(rng.integers(0, 1000)))
        if step == 10:  # a request leaves, one joins
            requests = [requests[0], requests[2], make_request(rng, "d", num_outputs=1, presence_penalty=-0.5)]
        if step == 20:  # same id, new request object (re-added after an abort)
            requests[1] = make_request(rng, "c", num_outputs=4, frequency_penalty=0.1)
        num_rows = 4 if step < 30 else 8
        assert_same_metadata(builder.build(requests, num_rows), build_sampling_metadata(requests, num_rows))


def test_padding_rows_sample_harmlessly():
    rng = np.random.default_rng(6)
    requests = [make_request(rng, "a", temperature=0.9, top_k=10, presence_penalty=0.4, logprobs=3)]
    md = build_sampling_metadata(requests, 8)
    logits = rng.standard_normal((8, 100)).astype(np.float32)
    out = jax.jit(sample)(logits, md, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.token_ids)[1:], logits[1:].argmax(-1))
    assert np.isfinite(np.asarray(out.sampled_logprob)).all() and np.isfinite(np.asarray(out.top_logprobs)).all()


def test_more_requests_than_rows_raises():
    rng = np.random.default_rng(7)
    requests = [make_request(rng, str(i)) for i in range(3)]
    with pytest.raises(ValueError) as e:
        build_sampling_metadata(requests, 2)
    assert "num_rows=2" in str(e.value) and "(3)" in str(e.value)


class CountingMatcher:
    """A grammar matcher stand-in: allows only token 3 and counts the masks asked of it."""

    bitmask_width = 2

    def __init__(self):
        self.masks = 0

    def fill_bitmask(self, row):
        self.masks += 1
        row[:] = [1 << 3, 0]


def test_grammar_rows_get_a_mask_only_when_they_sample():
    """A grammar row whose prompt chunk is not its last (nothing pending: its sample is dropped) keeps every token
    and its matcher is not asked; the row that samples (one pending token) gets its grammar's mask."""
    rng = np.random.default_rng(7)
    chunked, sampling = CountingMatcher(), CountingMatcher()
    requests = [make_request(rng, "plain"), make_request(rng, "chunked"), make_request(rng, "sampling")]
    requests[1].structured_output, requests[2].structured_output = chunked, sampling
    requests[2].num_pending_tokens = 1
    md = build_sampling_metadata(requests, 4)
    np.testing.assert_array_equal(md.token_bitmask, [[-1, -1], [-1, -1], [1 << 3, 0], [-1, -1]])
    assert (chunked.masks, sampling.masks) == (0, 1)
    requests[2].num_pending_tokens = 2
    with pytest.raises(RuntimeError, match="'sampling' follows a grammar but has tokens in flight"):
        build_sampling_metadata(requests, 4)
