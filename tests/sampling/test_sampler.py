"""sample() and its logits processors against independent numpy references, and sampled distributions against the
exact target distribution by Pearson's chi-square test (20k draws of one row in a single call)."""

import jax
import numpy as np
import pytest
from scipy.special import chdtri  # chdtri(dof, q): the chi-square value exceeded with probability q

from jaxllm.sampling import SamplingMetadata, sample, seeded_request_key
from jaxllm.sampling.builder import seed_key_data
from jaxllm.sampling.logits_processors import apply_min_p, apply_top_k_top_p
from jaxllm.sampling.sampler import process_logits, row_keys

F32_TOL = dict(rtol=1e-6, atol=1e-5)  # float32 elementwise ops and length-V reductions
NUM_DRAWS = 20_000
CHI2_FALSE_ALARM = 1e-6  # probability that a correct sampler fails a distribution check

# Tests share a few shapes so that they share compiled programs (compiling dominates this file's run time).
sample_jit = jax.jit(sample)
filters_jit = jax.jit(lambda logits, top_k, top_p, min_p: apply_min_p(apply_top_k_top_p(logits, top_k, top_p), min_p))
row_keys_jit = jax.jit(row_keys)
DRAW_VOCAB = 32  # distribution tests: NUM_DRAWS rows of one [DRAW_VOCAB] row of logits
WIDE_ROWS, WIDE_VOCAB = 64, 4096  # stream tests: a repeat of a near-flat draw has chance ~1/4096


def make_metadata(num_rows, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, presence=0.0, frequency=0.0,
                  repetition=1.0, seeded=False, seed=0, sample_index=0, output_position=0, suppressed=None,
                  prompt=None, output=None, allowed=None, bias_ids=None, bias_values=None,
                  max_num_logprobs=0):  # fmt: skip
    """SamplingMetadata straight from per-row values (scalars broadcast); flags follow the values."""

    def column(value, dtype):
        return np.broadcast_to(np.asarray(value, dtype), (num_rows,)).copy()

    temperature, top_k, top_p = column(temperature, np.float32), column(top_k, np.int32), column(top_p, np.float32)
    sampled = temperature >= 1e-5
    empty = np.full((num_rows, 0), -1, np.int32)
    return SamplingMetadata(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=column(min_p, np.float32),
        presence_penalty=column(presence, np.float32),
        frequency_penalty=column(frequency, np.float32),
        repetition_penalty=column(repetition, np.float32),
        seeded=column(seeded, bool),
        seed=seed_key_data([int(s) for s in np.broadcast_to(np.asarray(seed), (num_rows,))]),
        sample_index=column(sample_index, np.int32),
        output_position=column(output_position, np.int32),
        suppressed_token_ids=empty if suppressed is None else np.asarray(suppressed, np.int32),
        prompt_token_ids=empty if prompt is None else np.asarray(prompt, np.int32),
        output_token_ids=empty if output is None else np.asarray(output, np.int32),
        allowed_token_ids=empty if allowed is None else np.asarray(allowed, np.int32),
        logit_bias_ids=empty if bias_ids is None else np.asarray(bias_ids, np.int32),
        logit_bias_values=np.asarray(np.zeros((num_rows, 0)) if bias_values is None else bias_values, np.float32),
        all_greedy=not sampled.any(),
        any_top_k_top_p=bool((sampled & ((top_k > 0) | (top_p < 1))).any()),
        any_penalties=prompt is not None,
        max_num_logprobs=max_num_logprobs,
    )


def random_logits(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---- numpy references ----


def ref_softmax(x):
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    e = np.where(finite, np.exp(x - x[finite].max()), 0.0)
    return e / e.sum()


def ref_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ref_kept_tokens(logits, top_k=0, top_p=1.0, min_p=0.0):
    """Boolean [V] of the tokens top-k, then top-p on the renormalised rest, then min-p leave (vLLM's order)."""
    order = np.argsort(-np.asarray(logits, np.float64), kind="stable")
    keep = np.zeros(len(logits), bool)
    k = len(logits) if top_k <= 0 else min(top_k, len(logits))
    candidates = order[:k]
    probs = ref_softmax(np.asarray(logits, np.float64)[candidates])
    mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    in_top_p = (mass_before < top_p) | (top_p >= 1.0)
    in_min_p = probs >= min_p * probs.max()
    keep[candidates[in_top_p & in_min_p]] = True
    return keep


def ref_target_probs(logits, temperature, **filters):
    scaled = np.asarray(logits, np.float64) / temperature
    kept = ref_kept_tokens(scaled, **filters)
    return ref_softmax(np.where(kept, scaled, -np.inf))


def ref_penalties(logits, prompt, output, presence, frequency, repetition):
    out = np.asarray(logits, np.float64).copy()
    num_rows, vocab_size = out.shape
    for s in range(num_rows):
        counts = np.zeros(vocab_size)
        for t in output[s]:
            if t >= 0:
                counts[t] += 1
        seen = counts > 0
        for t in prompt[s]:
            if t >= 0:
                seen[t] = True
        row = out[s]
        row[seen] = np.where(row[seen] > 0, row[seen] / repetition[s], row[seen] * repetition[s])
        row -= frequency[s] * counts + presence[s] * (counts > 0)
    return out


def chi_square(tokens, probs):
    """Pearson's statistic of the token counts against probs (bins expecting < 5 draws merged) and its dof."""
    counts = np.bincount(tokens, minlength=len(probs))
    expected = probs * len(tokens)
    big = expected >= 5
    small = (probs > 0) & ~big
    observed = np.append(counts[big], counts[small].sum()) if small.any() else counts[big]
    expected = np.append(expected[big], expected[small].sum()) if small.any() else expected[big]
    return float(((observed - expected) ** 2 / expected).sum()), len(observed) - 1


def assert_drawn_from(tokens, probs):
    tokens = np.asarray(tokens)
    assert not np.isin(tokens, np.flatnonzero(probs == 0)).any(), "a token of probability 0 was sampled"
    stat, dof = chi_square(tokens, probs)
    bound = chdtri(dof, CHI2_FALSE_ALARM)
    assert stat < bound, f"chi-square {stat:.1f} >= {bound:.1f} (dof {dof})"


def draw_many(logits_row, suppressed_ids=(), **params):
    """NUM_DRAWS samples of one row of logits in one call (suppressed ids always [S, 8], so programs are shared)."""
    suppressed = np.full((NUM_DRAWS, 8), -1, np.int32)
    suppressed[:, : len(suppressed_ids)] = suppressed_ids
    logits = np.broadcast_to(logits_row, (NUM_DRAWS, DRAW_VOCAB))
    md = make_metadata(NUM_DRAWS, suppressed=suppressed, **params)
    return np.asarray(sample_jit(logits, md, jax.random.key(1234)).token_ids)


# ---- greedy and distributions ----


def test_greedy_rows_take_the_argmax_even_next_to_sampled_rows():
    rng = np.random.default_rng(0)
    logits = random_logits(rng, (WIDE_ROWS, WIDE_VOCAB))
    temperature = rng.choice(np.float32([0.0, 1e-6, 0.7, 1.0]), WIDE_ROWS)
    out = sample_jit(logits, make_metadata(WIDE_ROWS, temperature=temperature), jax.random.key(0))
    greedy = temperature < 1e-5
    np.testing.assert_array_equal(np.asarray(out.token_ids)[greedy], logits.argmax(-1)[greedy])
    all_greedy = sample_jit(logits, make_metadata(WIDE_ROWS), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(all_greedy.token_ids), logits.argmax(-1))


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_samples_follow_softmax_of_scaled_logits(seeded):
    logits = random_logits(np.random.default_rng(1), DRAW_VOCAB)
    seeds = np.arange(NUM_DRAWS) if seeded else 0
    tokens = draw_many(logits, temperature=0.6, seeded=seeded, seed=seeds)
    assert_drawn_from(tokens, ref_target_probs(logits, 0.6))
    # The check has power: the same draws fail against the unscaled softmax.
    stat, dof = chi_square(tokens, ref_softmax(logits))
    assert stat > chdtri(dof, CHI2_FALSE_ALARM)


def test_top_k_samples_only_the_top_k_renormalised():
    logits = random_logits(np.random.default_rng(2), DRAW_VOCAB)
    tokens = draw_many(logits, temperature=1.3, top_k=5)
    probs = ref_target_probs(logits, 1.3, top_k=5)
    assert set(np.unique(tokens)) == set(np.argsort(-logits)[:5])
    assert_drawn_from(tokens, probs)


def test_top_p_samples_the_smallest_prefix_reaching_p():
    logits = random_logits(np.random.default_rng(3), DRAW_VOCAB)
    cumulative = np.cumsum(np.sort(ref_softmax(logits / 0.9))[::-1])
    top_p = float((cumulative[5] + cumulative[6]) / 2)  # reaches p with 7 tokens, away from any boundary
    probs = ref_target_probs(logits, 0.9, top_p=top_p)
    assert (probs > 0).sum() == 7
    assert_drawn_from(draw_many(logits, temperature=0.9, top_p=top_p), probs)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    logits = random_logits(np.random.default_rng(4), DRAW_VOCAB, scale=1.5)
    probs = ref_target_probs(logits, 1.0, min_p=0.1)
    assert 2 < (probs > 0).sum() < DRAW_VOCAB
    assert_drawn_from(draw_many(logits, temperature=1.0, min_p=0.1), probs)


def test_top_k_then_top_p_then_min_p_combined():
    logits = random_logits(np.random.default_rng(5), DRAW_VOCAB, scale=1.5)
    scaled = logits / 1.4
    top10 = np.sort(ref_softmax(np.sort(scaled)[::-1][:10]))[::-1]
    top_p = float((np.cumsum(top10)[6] + np.cumsum(top10)[7]) / 2)  # 8 of the top 10
    min_p = float((top10[6] + top10[7]) / 2 / top10[0])  # then min-p cuts the 8th
    probs = ref_target_probs(logits, 1.4, top_k=10, top_p=top_p, min_p=min_p)
    assert (probs > 0).sum() == 7
    assert_drawn_from(draw_many(logits, temperature=1.4, top_k=10, top_p=top_p, min_p=min_p), probs)


def test_suppressed_tokens_are_never_sampled():
    logits = random_logits(np.random.default_rng(9), DRAW_VOCAB)
    suppressed = np.argsort(-logits)[[0, 1, 5, 20]]  # includes the two most likely tokens
    temperature = np.where(np.arange(NUM_DRAWS) % 2 == 0, 1.5, 0.0)
    tokens = draw_many(logits, suppressed_ids=suppressed, temperature=temperature)
    allowed = np.where(np.isin(np.arange(DRAW_VOCAB), suppressed), -np.inf, logits)
    np.testing.assert_array_equal(tokens[1::2], allowed.argmax())
    assert_drawn_from(tokens[::2], ref_target_probs(allowed, 1.5))


def test_allowed_token_ids_bound_greedy_and_sampled_rows_and_leave_other_rows_alone():
    """Rows with an allow-list (greedy, or sampled at temperature 1.5 from the renormalised allowed set); rows
    without one in the same call are bit-identical to a call with no allow-lists at all."""
    rng = np.random.default_rng(12)
    logits_row = random_logits(rng, DRAW_VOCAB)
    allowed_ids = np.argsort(logits_row)[[0, 3, 9, 17, 30]]  # includes the least likely token
    allowed = np.full((NUM_DRAWS, 8), -1, np.int32)
    allowed[: NUM_DRAWS // 2, : len(allowed_ids)] = allowed_ids  # the second half has none
    temperature = np.where(np.arange(NUM_DRAWS) % 2 == 0, 1.5, 0.0)
    logits = np.broadcast_to(logits_row, (NUM_DRAWS, DRAW_VOCAB))
    md = make_metadata(NUM_DRAWS, allowed=allowed, temperature=temperature)
    tokens = np.asarray(sample_jit(logits, md, jax.random.key(5)).token_ids)
    kept = np.where(np.isin(np.arange(DRAW_VOCAB), allowed_ids), logits_row, -np.inf)
    half = NUM_DRAWS // 2
    np.testing.assert_array_equal(tokens[1:half:2], kept.argmax())
    assert_drawn_from(tokens[:half:2], ref_target_probs(kept, 1.5))
    plain = make_metadata(NUM_DRAWS, temperature=temperature)
    unrestricted = np.asarray(sample_jit(logits, plain, jax.random.key(5)).token_ids)
    np.testing.assert_array_equal(tokens[half:], unrestricted[half:])


def test_logit_bias_adds_to_the_named_logits_before_penalties():
    """Processed logits against numpy: bias first, then vLLM's penalties; padding ids (-1) add nothing."""
    logits, prompt, output, penalties = penalty_case(np.random.default_rng(13))
    num_rows, vocab_size = logits.shape
    rng = np.random.default_rng(14)
    bias_ids = np.full((num_rows, 8), -1, np.int32)
    bias_values = np.zeros((num_rows, 8), np.float32)
    biased = logits.astype(np.float64).copy()
    for s in range(0, num_rows, 2):  # odd rows have no bias
        ids = rng.choice(vocab_size, 5, replace=False)
        bias_ids[s, :5], bias_values[s, :5] = ids, rng.uniform(-30, 30, 5)
        biased[s, ids] += bias_values[s, :5]
    md = make_metadata(num_rows, prompt=prompt, output=output, bias_ids=bias_ids, bias_values=bias_values, **penalties)
    expected = ref_penalties(biased, prompt, output, *penalties.values())
    np.testing.assert_allclose(np.asarray(jax.jit(process_logits)(logits, md)), expected, **F32_TOL)


# ---- filters and penalties against references ----


def test_filter_masks_match_reference_row_by_row():
    rng = np.random.default_rng(6)
    num_rows, vocab_size = 16, 1024
    logits = random_logits(rng, (num_rows, vocab_size), scale=2.0)
    top_k = rng.choice([0, 1, 3, 17, 1023, 1024, 5000], num_rows).astype(np.int32)
    top_p = np.ones(num_rows, np.float32)
    for s in range(0, num_rows, 2):  # half the rows also use top-p, cut midway between cumulative masses
        k = vocab_size if top_k[s] == 0 else min(top_k[s], vocab_size)
        c = np.cumsum(np.sort(ref_softmax(np.sort(logits[s])[::-1][:k]))[::-1])
        m = rng.integers(0, min(len(c) - 1, 40)) if len(c) > 1 else 0
        top_p[s] = (c[m] + c[m + 1]) / 2 if len(c) > 1 else 0.5
    min_p = np.where(np.arange(num_rows) % 3 == 0, 0.05, 0.0).astype(np.float32)
    filtered = np.asarray(filters_jit(logits, top_k, top_p, min_p))
    for s in range(num_rows):
        kept = ref_kept_tokens(logits[s], top_k[s], top_p[s], min_p[s])
        np.testing.assert_array_equal(np.isfinite(filtered[s]), kept, err_msg=f"row {s}")
        np.testing.assert_array_equal(filtered[s][kept], logits[s][kept])  # kept logits untouched


def test_filters_switched_off_leave_logits_bit_identical():
    logits = random_logits(np.random.default_rng(7), (16, 1024), scale=3.0)
    top_k = np.array([0, 1024, 9999] * 5 + [0], np.int32)
    out = filters_jit(logits, top_k, np.ones(16, np.float32), np.zeros(16, np.float32))
    np.testing.assert_array_equal(np.asarray(out), logits)


def penalty_case(rng, num_rows=6, vocab_size=50):
    logits = random_logits(rng, (num_rows, vocab_size), scale=3.0)
    prompt = np.full((num_rows, 64), -1, np.int32)
    output = np.full((num_rows, 64), -1, np.int32)
    for s in range(num_rows):
        prompt[s, : 5 + 3 * s] = rng.integers(0, vocab_size, 5 + 3 * s)
        output[s, : 4 * s] = rng.integers(0, 12, 4 * s)  # few distinct ids: repeats give counts > 1
    penalties = dict(
        presence=rng.uniform(-2, 2, num_rows).astype(np.float32),
        frequency=rng.uniform(-2, 2, num_rows).astype(np.float32),
        repetition=rng.uniform(0.5, 2.0, num_rows).astype(np.float32),
    )
    return logits, prompt, output, penalties


def test_penalties_match_reference():
    logits, prompt, output, penalties = penalty_case(np.random.default_rng(8))
    md = make_metadata(len(logits), prompt=prompt, output=output, **penalties)
    expected = ref_penalties(logits, prompt, output, *penalties.values())
    np.testing.assert_allclose(np.asarray(jax.jit(process_logits)(logits, md)), expected, **F32_TOL)
    tokens = sample_jit(logits, md, jax.random.key(0)).token_ids
    np.testing.assert_array_equal(np.asarray(tokens), expected.argmax(-1))
    assert (expected.argmax(-1) != logits.argmax(-1)).any(), "penalties should change some greedy choice"


def test_logprobs_are_the_raw_log_softmax_not_the_processed_one():
    logits, prompt, output, penalties = penalty_case(np.random.default_rng(13))
    md = make_metadata(len(logits), prompt=prompt, output=output, max_num_logprobs=5, **penalties)
    out = sample_jit(logits, md, jax.random.key(0))
    expected = ref_log_softmax(logits)
    tokens = np.asarray(out.token_ids)
    assert (tokens != logits.argmax(-1)).any()  # penalties moved the choice, not the logprobs
    np.testing.assert_allclose(np.asarray(out.sampled_logprob), expected[np.arange(len(logits)), tokens], **F32_TOL)
    top_ids = np.argsort(-expected, axis=-1)[:, :5]
    np.testing.assert_array_equal(np.asarray(out.top_token_ids), top_ids)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(expected, top_ids, -1), **F32_TOL)
    no_logprobs = sample_jit(logits, md.replace(max_num_logprobs=0), jax.random.key(0))
    assert no_logprobs.top_token_ids.shape == (len(logits), 0) and no_logprobs.top_logprobs.shape == (len(logits), 0)
    np.testing.assert_array_equal(np.asarray(no_logprobs.token_ids), tokens)


def test_sampled_rank_is_the_rank_in_the_whole_vocabulary():
    """Sampled at temperature 3 the token is often far from the top: its rank counts every token of the row more
    likely than it (from the raw log-softmax, as the logprob), whatever the top-k width; 0 when no logprobs are
    asked."""
    rng = np.random.default_rng(17)
    num_rows, vocab_size = 16, 300
    logits = rng.standard_normal((num_rows, vocab_size)).astype(np.float32)
    md = make_metadata(num_rows, temperature=3.0, max_num_logprobs=2)
    out = sample_jit(logits, md, jax.random.key(4))
    tokens = np.asarray(out.token_ids)
    expected = ref_log_softmax(logits)
    chosen = expected[np.arange(num_rows), tokens]
    want = 1 + (expected > chosen[:, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(out.sampled_rank), want)
    assert (want > 2).sum() >= num_rows // 2  # most sampled tokens lie outside the top 2 the output carries
    greedy = sample_jit(logits, make_metadata(num_rows, max_num_logprobs=1), jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(greedy.sampled_rank), np.ones(num_rows))
    no_logprobs = sample_jit(logits, md.replace(max_num_logprobs=0), jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(no_logprobs.sampled_rank), np.zeros(num_rows))


def test_in_flight_tokens_count_as_outputs_in_the_penalties():
    """A row's output token still on the device (async scheduling) is penalised as if it were in its history."""
    rng = np.random.default_rng(21)
    logits, prompt, output, penalties = penalty_case(rng)
    in_flight = rng.integers(0, 12, len(logits)).astype(np.int32)
    in_flight[::3] = -1  # rows with nothing in flight
    md = make_metadata(len(logits), prompt=prompt, output=output, **penalties)
    with_token = np.concatenate([output, in_flight[:, None]], axis=1)
    expected = ref_penalties(logits, prompt, with_token, *penalties.values())
    got = jax.jit(process_logits)(logits, md, in_flight)
    np.testing.assert_allclose(np.asarray(got), expected, **F32_TOL)
    without = ref_penalties(logits, prompt, output, *penalties.values())
    assert not np.allclose(expected, without), "the in-flight tokens should change some penalised logit"


def ref_log_softmax_masked(x):
    """log-softmax over the finite entries; -inf stays -inf."""
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    out = np.full(x.shape, -np.inf)
    for s in range(len(x)):
        row = x[s, finite[s]]
        out[s, finite[s]] = row - row.max() - np.log(np.exp(row - row.max()).sum())
    return out


@pytest.mark.parametrize("mode", ["raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"])
def test_logprobs_modes_hold_what_each_names(mode):
    """vLLM's logprobs_mode: raw values from the model's logits; processed ones from what each row's token was chosen
    from (greedy rows: after the penalties; sampled rows: after temperature, top-k, top-p and min-p too)."""
    rng = np.random.default_rng(17)
    logits, prompt, output, penalties = penalty_case(rng)
    num_rows = len(logits)
    temperature = np.where(np.arange(num_rows) % 2 == 0, 0.0, 0.7).astype(np.float32)
    filters = dict(top_k=6, top_p=0.9, min_p=0.05)
    md = make_metadata(num_rows, temperature=temperature, prompt=prompt, output=output, max_num_logprobs=1,
                       **filters, **penalties)  # fmt: skip
    out = jax.jit(sample, static_argnames="logprobs_mode")(logits, md, jax.random.key(3), logprobs_mode=mode)
    penalised = ref_penalties(logits, prompt, output, *penalties.values())
    processed = penalised.copy()
    for s in np.flatnonzero(temperature > 0):
        scaled = penalised[s] / temperature[s]
        processed[s] = np.where(ref_kept_tokens(scaled, **filters), scaled, -np.inf)
    expected = {
        "raw_logprobs": ref_log_softmax(logits),
        "raw_logits": np.asarray(logits, np.float64),
        "processed_logprobs": ref_log_softmax_masked(processed),
        "processed_logits": processed,
    }[mode]
    tokens = np.asarray(out.token_ids)
    assert np.isfinite(processed[np.arange(num_rows), tokens]).all()  # every token was among its row's kept ones
    np.testing.assert_allclose(np.asarray(out.sampled_logprob), expected[np.arange(num_rows), tokens], **F32_TOL)
    np.testing.assert_array_equal(np.asarray(out.top_token_ids)[:, 0], expected.argmax(-1))
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[:, 0], expected.max(-1), **F32_TOL)


def test_an_unknown_logprobs_mode_is_an_error():
    md = make_metadata(2, max_num_logprobs=1)
    with pytest.raises(ValueError, match="logprobs_mode"):
        sample(np.zeros((2, 8), np.float32) + 1.0, md, jax.random.key(0), logprobs_mode="logits")


# ---- keys and seeds ----


def seeded_batch(rng, logits_rows, seeds, rows, num_rows, *, busy_neighbours):
    """A batch of num_rows with the seeded requests at `rows`; the other rows are unseeded (top-k and penalties
    switched on when busy_neighbours, so the batch compiles a different program)."""
    logits = random_logits(rng, (num_rows, WIDE_VOCAB))
    logits[rows] = logits_rows
    seeded = np.zeros(num_rows, bool)
    seeded[rows] = True
    seed = np.zeros(num_rows, np.uint32)
    seed[rows] = seeds
    top_k = np.where(seeded | (not busy_neighbours), 0, 7)
    prompt = output = None
    if busy_neighbours:
        prompt = np.where(seeded[:, None], -1, rng.integers(0, WIDE_VOCAB, (num_rows, 64))).astype(np.int32)
        output = np.full((num_rows, 64), -1, np.int32)
    md = make_metadata(num_rows, temperature=1.0, top_k=top_k, seeded=seeded, seed=seed, output_position=3,
                       prompt=prompt, output=output, repetition=np.where(seeded, 1.0, 1.3))  # fmt: skip
    return logits, md


def test_seeded_rows_sample_the_same_tokens_in_any_batch_and_row():
    rng = np.random.default_rng(10)
    logits_rows = random_logits(rng, (WIDE_ROWS, WIDE_VOCAB), scale=0.5)
    seeds = rng.integers(0, 2**32, WIDE_ROWS, dtype=np.uint64).astype(np.uint32)
    logits_a, md_a = seeded_batch(rng, logits_rows, seeds, np.arange(WIDE_ROWS), WIDE_ROWS, busy_neighbours=False)
    rows_b = rng.permutation(2 * WIDE_ROWS)[:WIDE_ROWS]
    logits_b, md_b = seeded_batch(rng, logits_rows, seeds, rows_b, 2 * WIDE_ROWS, busy_neighbours=True)
    assert md_b.any_top_k_top_p and md_b.any_penalties and not md_a.any_top_k_top_p
    tokens_a = np.asarray(sample_jit(logits_a, md_a, jax.random.key(1)).token_ids)
    tokens_b = np.asarray(sample_jit(logits_b, md_b, jax.random.key(2)).token_ids)
    np.testing.assert_array_equal(tokens_a, tokens_b[rows_b])
    assert len(np.unique(tokens_a)) > WIDE_ROWS // 2  # real draws, not a constant


def test_seeded_stream_moves_with_sample_index_and_output_position():
    rng = np.random.default_rng(11)
    logits = random_logits(rng, (WIDE_ROWS, WIDE_VOCAB), scale=0.1)  # near flat
    seeds = rng.integers(0, 2**31, WIDE_ROWS)

    def draw(**kw):
        md = make_metadata(WIDE_ROWS, temperature=1.0, seeded=True, seed=seeds, **kw)
        return np.asarray(sample_jit(logits, md, jax.random.key(0)).token_ids)

    base = draw(sample_index=0, output_position=5)
    np.testing.assert_array_equal(draw(sample_index=0, output_position=5), base)
    assert (draw(sample_index=1, output_position=5) == base).sum() <= 2
    assert (draw(sample_index=0, output_position=6) == base).sum() <= 2


def test_unseeded_rows_change_with_the_step_key():
    logits = random_logits(np.random.default_rng(12), (WIDE_ROWS, WIDE_VOCAB), scale=0.1)
    md = make_metadata(WIDE_ROWS, temperature=1.0)
    first = np.asarray(sample_jit(logits, md, jax.random.key(5)).token_ids)
    np.testing.assert_array_equal(np.asarray(sample_jit(logits, md, jax.random.key(5)).token_ids), first)
    assert (np.asarray(sample_jit(logits, md, jax.random.key(6)).token_ids) == first).sum() <= 2


def test_row_keys_follow_the_seeded_formula_and_accept_raw_step_keys():
    seeds = np.uint32([7, 2**32 - 1, 7, 0, 0, 0])  # rows 0-3 seeded, rows 4-5 not
    indices, positions = np.int32([2, 0, 3, 1, 0, 0]), np.int32([9, 4, 9, 0, 0, 0])
    md = make_metadata(6, seeded=[True] * 4 + [False] * 2, seed=seeds, sample_index=indices, output_position=positions)
    typed = np.asarray(row_keys_jit(md, jax.random.key(5)))
    np.testing.assert_array_equal(np.asarray(row_keys_jit(md, jax.random.PRNGKey(5))), typed)
    for row in range(4):
        formula = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seeds[row]), indices[row]), positions[row])
        np.testing.assert_array_equal(typed[row], formula)
        seed_key = seed_key_data([seeds[row]])[0]
        np.testing.assert_array_equal(seeded_request_key(seed_key, indices[row], positions[row]), formula)
    assert len({tuple(k) for k in typed}) == 6
    assert not (np.asarray(row_keys_jit(md, jax.random.key(6)))[4:] == typed[4:]).all()


def test_seeds_past_32_bits_draw_streams_of_their_own():
    """Seeds that agree in their low 32 bits (s and s + 2**32; 2**32 - 1, -1 and -2**63 + 2**32 - 1) draw different
    tokens, each from the key of its 64 bits; -1 and 2**64 - 1 are one seed mod 2**64 and draw the same."""
    rng = np.random.default_rng(13)
    logits = random_logits(rng, (WIDE_ROWS, WIDE_VOCAB), scale=0.1)  # near flat
    low = rng.integers(0, 2**31, WIDE_ROWS)

    def draw(seeds):
        md = make_metadata(WIDE_ROWS, temperature=1.0, seeded=True, seed=np.asarray(seeds, object))
        return np.asarray(sample_jit(logits, md, jax.random.key(0)).token_ids)

    base = draw([int(s) for s in low])
    assert (draw([int(s) + 2**32 for s in low]) == base).sum() <= 2
    assert (draw([int(s) + 2**63 for s in low]) == base).sum() <= 2
    ones = draw([2**32 - 1] * WIDE_ROWS)
    assert (draw([-1] * WIDE_ROWS) == ones).sum() <= 2
    assert (draw([-(2**63) + 2**32 - 1] * WIDE_ROWS) == ones).sum() <= 2
    np.testing.assert_array_equal(draw([-1] * WIDE_ROWS), draw([2**64 - 1] * WIDE_ROWS))
    keys = seed_key_data([7, 2**40 + 9, -1])
    np.testing.assert_array_equal(keys, np.uint32([[0, 7], [2**8, 9], [2**32 - 1, 2**32 - 1]]))
    np.testing.assert_array_equal(keys[0], jax.random.PRNGKey(7))  # below 2**32: PRNGKey(seed)'s key


# ---- tracing and errors ----


def test_values_change_without_retracing_and_flags_change_with_one():
    traces = []

    def traced_sample(logits, md, key):
        traces.append(md.num_rows)
        return sample(logits, md, key)

    step = jax.jit(traced_sample)
    rng = np.random.default_rng(14)
    logits, prompt, output, _ = penalty_case(rng)
    for repetition, seed, position in [(0.5, 1, 0), (1.5, 2, 7), (0.9, 3, 9)]:
        md = make_metadata(6, repetition=repetition, seeded=True, seed=seed, output_position=position,
                           prompt=rng.permutation(prompt), output=output)  # fmt: skip
        step(logits, md, jax.random.key(0))
    assert len(traces) == 1
    step(logits, make_metadata(6), jax.random.key(0))  # no penalties: another program
    assert len(traces) == 2


def test_logits_of_the_wrong_shape_raise():
    md = make_metadata(4)
    with pytest.raises(ValueError) as e:
        sample(np.ones((3, 10), np.float32), md, jax.random.key(0))
    assert "(3, 10)" in str(e.value) and "S=4" in str(e.value)
