"""OutputProcessor and IncrementalDetokenizer: text, stop strings, special tokens, logprobs, n samples, aborts.

Uses a real byte-level BPE tokenizer trained here on a short text (the SmolLM2 GGUF tokenizer needs torch to load),
wrapped in transformers' PreTrainedTokenizerFast. References are the tokenizer's own full ``decode``.
"""

import dataclasses
import random

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxllm.core.block_manager import BlockManager
from jaxllm.core.engine_core_output import EngineCoreOutput
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.scheduler_config import SchedulerConfig
from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.output_processor import OutputProcessor, make_child_requests
from jaxllm.outputs import Logprob
from jaxllm.request import RequestStatus
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from tests.core.toy_runner import ToyRunner, toy_logprobs

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Héllo wörld! 你好，世界。 Stop here; END of story.",
    "Streaming text must match the full decode, even with emoji 🙂🚀 and accents: café, naïve.",
] * 4
CHAR_POOL = list("abcdefghij klmnopqrstuvwxyz.,;!?") + list("éöïç你好世界🙂🚀") + ["the ", "fox ", " lazy"]


@pytest.fixture(scope="module")
def tokenizer():
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(TRAINING_TEXT, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, eos_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"]
    )


class CountingTokenizer:
    """Delegates to a tokenizer and counts ``decode`` calls."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.num_decodes = 0

    def decode(self, *args, **kwargs):
        self.num_decodes += 1
        return self.tokenizer.decode(*args, **kwargs)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(CHAR_POOL) for _ in range(n))


def add(processor, request_id, prompt_ids, stream=False, **params):
    """``stream``: CUMULATIVE outputs, else FINAL_ONLY (unless ``params`` names an ``output_kind``)."""
    params.setdefault("output_kind", RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY)
    requests = make_child_requests(request_id, prompt_ids, SamplingParams(**params), frozenset([0]))
    processor.add_request(request_id, "a prompt", requests)
    return requests


def feed(processor, request_id, token_ids, finish=RequestStatus.FINISHED_LENGTH, logprobs=None):
    """One token per step; the last step carries ``finish``. Returns each step's ProcessedOutputs."""
    results = []
    for i, token_id in enumerate(token_ids):
        last = i == len(token_ids) - 1
        output = EngineCoreOutput(
            request_id,
            [token_id],
            new_logprobs=None if logprobs is None else [logprobs[i]],
            finish_status=finish if last else None,
        )
        results.append(processor.process_outputs([output]))
    return results


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_text_equals_full_decode(tokenizer, stream, seed):
    rng = random.Random(seed)
    prompt_ids = tokenizer.encode(random_text(rng, 12))
    output_ids = tokenizer.encode(random_text(rng, 40))
    processor = OutputProcessor(tokenizer)
    add(processor, "r", prompt_ids, stream=stream)
    results = feed(processor, "r", output_ids)
    final = results[-1].request_outputs[0]
    assert final.finished and final.outputs[0].finish_reason == "length"
    assert final.outputs[0].text == tokenizer.decode(output_ids)
    assert final.outputs[0].token_ids == output_ids
    if stream:  # every step's text is a prefix of the final text
        texts = [r.request_outputs[0].outputs[0].text for r in results]
        assert all(final.outputs[0].text.startswith(text) for text in texts) and len(set(texts)) > 10
    else:
        assert all(not r.request_outputs for r in results[:-1])


def test_detokenizer_holds_incomplete_characters(tokenizer):
    output_ids = tokenizer.encode("🙂🚀你好")  # multi-byte characters split over byte tokens
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi "))
    deltas = []
    for token_id in output_ids:
        detokenizer.append([token_id])
        deltas.append(detokenizer.decode_pending())
    assert "".join(deltas) == "🙂🚀你好"
    assert all("\ufffd" not in delta for delta in deltas)
    assert deltas.count("") > 0  # some tokens ended mid-character and waited


def test_deferred_detokenization_decodes_only_at_finish(tokenizer):
    counting = CountingTokenizer(tokenizer)
    processor = OutputProcessor(counting)
    output_ids = tokenizer.encode(random_text(random.Random(3), 30))
    add(processor, "r", tokenizer.encode("prompt"))
    feed(processor, "r", output_ids[:-1], finish=None)
    assert counting.num_decodes == 0
    result = processor.process_outputs(
        [EngineCoreOutput("r", output_ids[-1:], finish_status=RequestStatus.FINISHED_LENGTH)]
    )
    assert counting.num_decodes == 2  # one window: prompt context, and prompt context + output
    assert result.request_outputs[0].outputs[0].text == tokenizer.decode(output_ids)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer, skip):
    output_ids = tokenizer.encode("fox <|im_start|>dog") + [0]  # ends with EOS
    processor = OutputProcessor(tokenizer)
    add(processor, "r", tokenizer.encode("hello"), skip_special_tokens=skip)
    result = feed(processor, "r", output_ids, finish=RequestStatus.FINISHED_STOPPED)[-1]
    completion = result.request_outputs[0].outputs[0]
    # the EOS that ended the request is in token_ids but never in the text (vLLM's rule); the inner special token
    # follows skip_special_tokens
    assert completion.text == tokenizer.decode(output_ids[:-1], skip_special_tokens=skip)
    assert ("<|im_start|>" in completion.text) != skip and "<|endoftext|>" not in completion.text
    assert completion.token_ids == output_ids
    assert completion.finish_reason == "stop" and completion.stop_reason is None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stopper", ["eos", "stop_token"])
def test_token_that_stops_the_request_is_in_the_text_only_when_asked(tokenizer, stream, include, stopper):
    rng = random.Random(7)
    output_ids = tokenizer.encode(random_text(rng, 20))
    stop_id = 0 if stopper == "eos" else output_ids[-1]  # add() makes 0 the EOS id
    if stopper == "eos":
        output_ids = output_ids + [0]
    processor = OutputProcessor(tokenizer)
    params = dict(include_stop_str_in_output=include, skip_special_tokens=False)
    if stopper == "stop_token":
        params["stop_token_ids"] = [stop_id]
    add(processor, "r", tokenizer.encode("hello"), stream=stream, **params)
    result = feed(processor, "r", output_ids, finish=RequestStatus.FINISHED_STOPPED)[-1]
    completion = result.request_outputs[0].outputs[0]
    kept = output_ids if include else output_ids[:-1]
    assert completion.text == tokenizer.decode(kept, skip_special_tokens=False)
    assert completion.token_ids == output_ids and completion.finish_reason == "stop"
    # a length finish on the same token keeps its text: only a stop ends without it
    processor = OutputProcessor(tokenizer)
    add(processor, "s", tokenizer.encode("hello"), stream=stream, **params)
    completion = feed(processor, "s", output_ids)[-1].request_outputs[0].outputs[0]
    assert completion.finish_reason == "length"
    assert completion.text == tokenizer.decode(output_ids, skip_special_tokens=False)


def first_step_containing(tokenizer, output_ids, stop):
    return next(k for k in range(1, len(output_ids) + 1) if stop in tokenizer.decode(output_ids[:k]))


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(tokenizer, include):
    text = "The quick brown fox jumps over the lazy dog. Stop here; END of story."
    output_ids = tokenizer.encode(text)
    stop = "fox jum"
    step = first_step_containing(tokenizer, output_ids, stop)
    assert stop not in tokenizer.decode([output_ids[step - 1]])  # the stop string spans several tokens
    processor = OutputProcessor(tokenizer)
    add(processor, "r", tokenizer.encode("go"), stop=["never there", stop], include_stop_str_in_output=include)
    results = feed(processor, "r", output_ids, finish=None)
    assert [bool(r.stopped_request_ids) for r in results] == [k == step - 1 for k in range(len(output_ids))]
    assert results[step - 1].stopped_request_ids == ["r"]
    completion = results[step - 1].request_outputs[0].outputs[0]
    end = text.index(stop) + (len(stop) if include else 0)
    assert completion.text == text[:end]
    assert completion.token_ids == output_ids[:step]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    assert all(not r.request_outputs for r in results[step:])  # later tokens of a stopped request are ignored
    assert not processor.has_unfinished_requests()


def test_earliest_stop_string_wins(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    output_ids = tokenizer.encode(text)
    processor = OutputProcessor(tokenizer)
    add(processor, "r", tokenizer.encode("go"), stop=["jumps", "brown f", "lazy"])
    # All tokens in one step (as with several tokens per step): every stop string is in the same new text.
    result = processor.process_outputs([EngineCoreOutput("r", output_ids)])
    completion = result.request_outputs[0].outputs[0]
    assert completion.text == text[: text.index("brown f")] and completion.stop_reason == "brown f"
    assert result.stopped_request_ids == ["r"]


def test_min_tokens_delays_stop_string(tokenizer):
    text = "stop now, or stop later, then end"
    output_ids = tokenizer.encode(text)
    first_step = first_step_containing(tokenizer, output_ids, "stop")
    processor = OutputProcessor(tokenizer)
    add(processor, "r", tokenizer.encode("go"), stop=["stop"], min_tokens=first_step + 1)
    results = feed(processor, "r", output_ids, finish=None)
    completion = next(r for r in results if r.request_outputs).request_outputs[0].outputs[0]
    assert completion.text == text[: text.index("stop", 1)]


@pytest.mark.parametrize("extra", [0, 1])
def test_stop_string_ends_a_request_only_in_a_token_after_the_first_min_tokens(tokenizer, extra):
    """vLLM's boundary: a stop string completed by token k stops the request when min_tokens < k, not at k."""
    text = "go on then stop here and keep going to the end"
    output_ids = tokenizer.encode(text)
    k = first_step_containing(tokenizer, output_ids, "stop")
    processor = OutputProcessor(tokenizer)
    add(processor, "r", tokenizer.encode("go"), stop=["stop"], min_tokens=k - 1 + extra)
    results = feed(processor, "r", output_ids)
    stopped_at = next(i for i, r in enumerate(results, start=1) if r.request_outputs)
    completion = results[stopped_at - 1].request_outputs[0].outputs[0]
    if extra:
        assert stopped_at == len(output_ids) and completion.finish_reason == "length"
    else:
        assert stopped_at == k and completion.finish_reason == "stop" and completion.text == text[: text.index("stop")]


def test_streaming_holds_back_possible_stop_prefix(tokenizer):
    text = "the quick brown fox jumps over the"
    output_ids = tokenizer.encode(text)
    stop = "lazy dog"
    processor = OutputProcessor(tokenizer)
    add(processor, "r", tokenizer.encode("go"), stream=True, stop=[stop])
    results = feed(processor, "r", output_ids)
    for k, result in enumerate(results[:-1], start=1):
        full = tokenizer.decode(output_ids[:k])
        assert result.request_outputs[0].outputs[0].text == full[: max(len(full) - (len(stop) - 1), 0)]
    assert results[-1].request_outputs[0].outputs[0].text == text


def test_without_tokenizer_returns_token_ids_only():
    processor = OutputProcessor(tokenizer=None)
    output_ids = [random.Random(4).randrange(1000) for _ in range(6)]
    add(processor, "r", [5, 6, 7])
    completion = feed(processor, "r", output_ids)[-1].request_outputs[0].outputs[0]
    assert completion.text == "" and completion.token_ids == output_ids
    with pytest.raises(ValueError) as error:
        add(processor, "s", [5, 6, 7], stop=["END"])
    assert "'END'" in str(error.value) and "tokenizer" in str(error.value)
    assert not processor.has_unfinished_requests()


def test_samples_grouped_under_parent(tokenizer):
    processor = OutputProcessor(tokenizer)
    requests = add(processor, "p", tokenizer.encode("go"), n=3)
    assert [(r.request_id, r.sample_index) for r in requests] == [("p-0", 0), ("p-1", 1), ("p-2", 2)]
    rng = random.Random(5)
    texts = [random_text(rng, 10) for _ in range(3)]
    ids = [tokenizer.encode(t) for t in texts]
    finishes = [RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH]
    for i in (2, 0):
        assert not any(r.request_outputs for r in feed(processor, f"p-{i}", ids[i], finish=finishes[i]))
    result = feed(processor, "p-1", ids[1], finish=finishes[1])[-1]
    (output,) = result.request_outputs
    assert output.request_id == "p" and output.finished and output.prompt == "a prompt"
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert [c.text for c in output.outputs] == [tokenizer.decode(i) for i in ids]
    assert [c.finish_reason for c in output.outputs] == ["length", "stop", "length"]
    assert output.metrics.last_token_time == output.metrics.finished_time
    assert output.metrics.arrival_time == requests[0].arrival_time


def test_logprobs_objects(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, "r", tokenizer.encode("go"), logprobs=3)
    output_ids = tokenizer.encode("brown fox")
    sampled = [toy_logprobs((t + 1) % 300, 3, 300) for t in output_ids]  # sampled token not among the top 3
    sampled[0] = toy_logprobs(output_ids[0], 3, 300)  # ... except for the first token: rank 1
    completion = feed(processor, "r", output_ids, logprobs=sampled)[-1].request_outputs[0].outputs[0]
    assert completion.cumulative_logprob == pytest.approx(sum(s.sampled_logprob for s in sampled))
    first = completion.logprobs[0]
    assert list(first) == sampled[0].top_token_ids
    assert first[output_ids[0]] == Logprob(sampled[0].sampled_logprob, 1, tokenizer.decode([output_ids[0]]))
    second = completion.logprobs[1]
    assert list(second) == [output_ids[1]] + sampled[1].top_token_ids
    assert second[output_ids[1]].rank is None
    assert [second[t].rank for t in sampled[1].top_token_ids] == [1, 2, 3]
    assert [second[t].logprob for t in sampled[1].top_token_ids] == sampled[1].top_logprobs


def test_sampled_token_rank_comes_from_the_runner(tokenizer):
    """A runner that ranks the sampled token in the whole vocabulary (the samplers do) sets its Logprob.rank, also
    outside the top k."""
    processor = OutputProcessor(tokenizer)
    add(processor, "r", tokenizer.encode("go"), logprobs=2)
    output_ids = tokenizer.encode("lazy dog")
    ranks = [random.Random(i).randint(3, 300) for i in range(len(output_ids))]
    sampled = [
        dataclasses.replace(toy_logprobs((t + 1) % 300, 2, 300), sampled_rank=rank)
        for t, rank in zip(output_ids, ranks, strict=True)
    ]
    completion = feed(processor, "r", output_ids, logprobs=sampled)[-1].request_outputs[0].outputs[0]
    assert [entry[t].rank for entry, t in zip(completion.logprobs, output_ids, strict=True)] == ranks


def test_abort_returns_child_ids_and_ignores_later_outputs(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, "p", tokenizer.encode("go"), n=2)
    add(processor, "q", tokenizer.encode("go"))
    assert processor.get_num_unfinished_requests() == 2
    feed(processor, "p-0", tokenizer.encode("fox"))  # p-0 finishes; p-1 is still running
    assert processor.abort_requests(["p", "missing"]) == ["p-1"]
    assert not feed(processor, "p-1", [5, 6])[-1].request_outputs
    assert processor.get_num_unfinished_requests() == 1
    with pytest.raises(ValueError) as error:
        add(processor, "q", [1])
    assert "'q'" in str(error.value)


def test_engine_loop_finishes_request_on_stop_string(tokenizer):
    """Scheduler + toy runner + output processor, wired as the engine wires them."""
    vocab = len(tokenizer)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=33)
    scheduler = Scheduler(config, BlockManager(config.num_blocks, config.block_size))
    runner = ToyRunner(config.num_blocks, config.block_size, vocab)
    processor = OutputProcessor(tokenizer)
    prompt_ids = tokenizer.encode("The quick")
    expected_ids = [(prompt_ids[-1] + 1 + i) % vocab for i in range(30)]
    stop = tokenizer.decode(expected_ids[2:5])
    assert "\ufffd" not in stop  # whole characters only
    step = first_step_containing(tokenizer, expected_ids, stop)
    requests = {}
    for request_id, params in (
        ("stops", SamplingParams(max_tokens=30, stop=[stop])),
        ("runs", SamplingParams(max_tokens=12)),
    ):
        (requests[request_id],) = make_child_requests(request_id, prompt_ids, params)
        processor.add_request(request_id, None, [requests[request_id]])
        scheduler.add_request(requests[request_id])
    finished = {}
    while scheduler.has_unfinished_requests():
        scheduler_output = scheduler.schedule()
        outputs = scheduler.update_from_output(scheduler_output, runner.execute(scheduler_output))
        processed = processor.process_outputs(outputs)
        scheduler.finish_requests(processed.stopped_request_ids, RequestStatus.FINISHED_STOPPED)
        finished.update((o.request_id, o) for o in processed.request_outputs)
    stopped = finished["stops"].outputs[0]
    assert stopped.token_ids == expected_ids[:step] and stopped.stop_reason == stop
    assert requests["stops"].status == RequestStatus.FINISHED_STOPPED
    assert finished["runs"].outputs[0].text == tokenizer.decode(expected_ids[:12])
    assert scheduler.block_manager.num_free_blocks == config.num_usable_blocks
    assert not processor.has_unfinished_requests()


def run_both_kinds(tokenizer, output_ids, finish=RequestStatus.FINISHED_LENGTH, **params):
    """The same tokens through a CUMULATIVE and a DELTA request; each step's outputs of both."""
    rng = random.Random(len(output_ids))
    sampled = [toy_logprobs(t if rng.random() < 0.5 else (t + 3) % 300, 2, 300) for t in output_ids]  # some unranked
    steps = {}
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA):
        processor = OutputProcessor(tokenizer)
        add(processor, "r", tokenizer.encode("go"), output_kind=kind, logprobs=2, **params)
        steps[kind] = [r.request_outputs for r in feed(processor, "r", output_ids, finish=finish, logprobs=sampled)]
    return steps[RequestOutputKind.CUMULATIVE], steps[RequestOutputKind.DELTA]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("stop", [None, "fox"])
def test_delta_outputs_add_up_to_the_cumulative_ones(tokenizer, seed, stop):
    rng = random.Random(seed)
    text = random_text(rng, 20) + " the fox " + random_text(rng, 20)
    output_ids = tokenizer.encode(text)
    cumulative, delta = run_both_kinds(tokenizer, output_ids, stop=[stop] if stop else None)
    assert [len(step) for step in delta] == [len(step) for step in cumulative]  # an output whenever it gains tokens
    text_so_far, ids_so_far, logprobs_so_far = "", [], []
    for whole_outputs, new_outputs in zip(cumulative, delta, strict=True):
        if not whole_outputs:
            continue  # after the stop string: nothing more for either
        (whole,), (new,) = whole_outputs, new_outputs
        (whole_completion,), (new_completion,) = whole.outputs, new.outputs
        text_so_far += new_completion.text
        ids_so_far += new_completion.token_ids
        logprobs_so_far += new_completion.logprobs
        assert len(new_completion.token_ids) == 1  # one token per step here
        assert (text_so_far, ids_so_far) == (whole_completion.text, whole_completion.token_ids)
        assert logprobs_so_far == whole_completion.logprobs
        assert new_completion.cumulative_logprob == whole_completion.cumulative_logprob  # a running sum, as in vLLM
        assert (new.finished, new_completion.finish_reason) == (whole.finished, whole_completion.finish_reason)
    assert whole.finished and (whole_completion.stop_reason == stop)
    assert whole_completion.text == (text[: text.index(stop)] if stop else text)


def test_delta_outputs_carry_only_the_samples_with_news_and_the_prompt_logprobs_once(tokenizer):
    processor = OutputProcessor(tokenizer)
    prompt_ids = tokenizer.encode("go on")
    requests = add(processor, "p", prompt_ids, n=2, output_kind=RequestOutputKind.DELTA, prompt_logprobs=1)
    stored = [None] + [(-0.5 - i, 2, [t], [-0.25]) for i, t in enumerate(prompt_ids[1:])]
    requests[0].prompt_logprobs = stored  # as the runner records them (every sample computes the same)
    ids = tokenizer.encode("brown fox")
    (first,) = feed(processor, "p-1", ids[:1], finish=None)[0].request_outputs
    assert [c.index for c in first.outputs] == [1] and first.outputs[0].token_ids == ids[:1]
    assert [entry and list(entry) for entry in first.prompt_logprobs] == [None] + [[t] for t in prompt_ids[1:]]
    (second,) = feed(processor, "p-0", ids, finish=None)[0].request_outputs
    assert [c.index for c in second.outputs] == [0] and second.prompt_logprobs is None
    last = feed(processor, "p-1", ids[1:])[-1].request_outputs[0]  # p-1 finishes; p-0 is still running
    assert [(c.index, c.finish_reason) for c in last.outputs] == [(1, "length")] and not last.finished


def test_output_kind_and_string_fields_are_checked():
    for bad in (dict(output_kind="delta"), dict(output_kind=1)):
        with pytest.raises(TypeError, match=f"output_kind must be a RequestOutputKind, got {bad['output_kind']!r}"):
            SamplingParams(**bad)
    with pytest.raises(TypeError, match="spaces_between_special_tokens must be a bool, got 'yes'"):
        SamplingParams(spaces_between_special_tokens="yes")
    with pytest.raises(TypeError, match="extra_args must be a dict or None, got"):
        SamplingParams(extra_args=["plugin"])
    kept = SamplingParams(extra_args={"plugin": 1}, spaces_between_special_tokens=False)
    assert kept.extra_args == {"plugin": 1} and kept.clone().output_kind is RequestOutputKind.CUMULATIVE
