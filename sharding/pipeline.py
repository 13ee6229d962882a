"""PipelinedModel: a sharded model run as P host-driven stages (MPMD), each a jitted program on its own sub-mesh.

Owns the stage programs, each stage's slice of the KV cache (donated into every call, so XLA updates it in place)
and dispatching microbatches through the stages. Stage ``s`` of microbatch ``m`` is dispatched right after stage
``s-1`` of it, and every call returns at once (JAX dispatch is asynchronous), so while stage 1 runs microbatch 0,
stage 0 already runs microbatch 1; activations move between sub-meshes with ``jax.device_put``. With P = 1 this is
the whole model in one program: tensor parallelism alone runs the same code. Nothing waits between ``run`` calls
either: a later call's first stage takes an earlier call's sampled tokens as they are on the device (pending
tokens, copied from the last stage's devices), so the next step's microbatch 0 can start on stage 0 while the
previous step's last microbatch is still on the later stages.

Inside a stage, tensor parallelism is GSPMD: the parameters arrive as NamedShardings from ``sharding.rules``, the
program's in/out shardings are pinned, and the residual stream is constrained to be replicated between layers. The
host side never blocks here; callers fetch what they need from the returned device arrays. A (micro)batch's host work
comes first and apart (``prepare``: every stage's and the head's step arrays packed into one buffer each,
``sharding.step_inputs``), then ``launch`` copies those buffers to the devices in one ``device_put`` and calls the
programs, so a runner can prepare a step on one thread while another launches the step before (``run`` is the two in
a row). The parameters go to each stage's program as a flat list (``jaxllm.runner.flat_state``). With async
scheduling the first stage also gathers the previous step's sampled tokens (still on the device) into its input ids,
and the last stage pads its sampled ids to a fixed row count so any bucket's output can feed the next.

The last stage's program ends at the logits of the sampled rows; the head (the sampler) runs after it in a program of
its own on the last stage's devices, as the one-device runner's sampler does; it also reads the vector its
microbatch's pending tokens came from, since a penalised row's newest output may be one of them
(``StepBatch.in_flight_rows``). The stage programs depend only on the
token bucket, so a sampling variant seen first while serving (penalties, logprobs, allowed or banned ids, a grammar's
bitmask) compiles only the small head program, never a stage: with the head inside the last stage, a request asking
for logprobs compiled every stage anew (the head arguments rode in every stage's packed buffer), bucket by bucket
while serving. A call with prompt-logprob targets (``SamplingParams.prompt_logprobs``) runs the last stage's
program variant that also returns them (``jaxllm.runner.prompt_logprobs``; compiled per bucket and top-k width on
first use); the other stages run their usual programs.

``stable_step_outputs=True`` (engines' default;
``JAXLLM_STABLE_STEP_OUTPUTS=0`` turns it off): the head writes its results into donated buffers that callers
hand back with ``release`` once read, and the last stage its logits (released once the head's call is dispatched),
so no CUDA graph holding an intermediate is updated every step (``jaxllm.runner.stable_outputs`` says why and what
it gained); each result then has ``ROW_SLACK`` rows past its own.
``stable_stage_outputs=True`` (experimental; ``JAXLLM_STABLE_STAGE_OUTPUTS=1``, not yet run on a GPU): every other
stage writes its hidden states into donated buffers the same way, released once the next stage's call is dispatched;
the next stage drops the slack rows.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxllm.models.activation_sharding import activation_sharding
from jaxllm.runner.flat_state import FlatState
from jaxllm.runner.kv_cache import allocate_kv_cache
from jaxllm.runner.model_runner import feed_pending_tokens
from jaxllm.runner.packed_transfer import Packed, PackedLayout, place, unpack
from jaxllm.runner.prompt_logprobs import RESULT_PREFIX, as_results
from jaxllm.runner.stable_outputs import ResultBuffers, write_into
from jaxllm.runner.step_batch import StepBatch
from jaxllm.runner.xla_options import CompilerOptions, ProgramsByOptions, sampler_options
from jaxllm.sampling import in_flight_output_tokens
from sharding.mesh import stage_meshes
from sharding.rules import activation_rules, check_single_replica, kv_cache_sharding, replicated
from sharding.stages import StageModule, stage_forward, stage_layer_ranges
from sharding.step_inputs import PreparedCall, head_arrays, stage_arrays

# (logits [S, V] float32, head_args, in-flight tokens [S]) -> results, on the last stage. The in-flight tokens are
# each row's newest output still on the device (the pending token its step fed in, -1 none; StepBatch.in_flight_rows)
HeadFn = Callable[[jax.Array, object, jax.Array], object]


def greedy_head(logits: jax.Array, head_args, in_flight_tokens: jax.Array) -> dict:
    return {"token_ids": jnp.argmax(logits, axis=-1).astype(jnp.int32)}  # [S]


def _zero_pending_tokens(rows: int, placement) -> jax.Array:
    return jax.device_put(np.zeros(rows, np.int32), placement)


@dataclasses.dataclass
class Stage:
    mesh: Mesh
    layers: range
    graphdef: nnx.GraphDef
    params: FlatState  # the stage's parameters, passed to its program as a flat list (jaxllm.runner.flat_state)
    programs: ProgramsByOptions  # the stage's jitted program, one per set of XLA options
    results: ResultBuffers  # donated output buffers (last stage: stable_step_outputs; others: stable_stage_outputs)
    kv_caches: list | None = None

    @property
    def state(self) -> nnx.State:
        """The stage's parameters as an NNX State."""
        return self.params.unflatten()


def _split_stage(model, meshes, ranges, index: int) -> tuple[nnx.GraphDef, FlatState]:
    """Stage ``index`` of ``model`` (layers ``ranges[index]`` on ``meshes[index]``): its graph and parameters."""
    is_first, is_last = index == 0, index == len(meshes) - 1
    module = StageModule(model, ranges[index], is_first=is_first, is_last=is_last)
    graphdef, state = nnx.split(module)
    if module.tied_embedding is not None and not is_first:
        state = _copy_tied_embedding(state, meshes[index])
    _check_placed(state, meshes[index], index)
    return graphdef, FlatState.of(state)


def _copy_tied_embedding(state, mesh: Mesh):
    """The tied embedding table lives on stage 0; the last stage gets its own copy (new Variables, same layout)."""
    flat = []
    for path, variable in nnx.to_flat_state(state):
        if path[0] == "tied_embedding":
            value = variable.get_value()
            variable = variable.replace(jax.device_put(value, NamedSharding(mesh, value.sharding.spec)))
        flat.append((path, variable))
    return nnx.from_flat_state(flat)


def _check_placed(state, mesh: Mesh, stage: int) -> None:
    devices = set(mesh.devices.flat)
    for path, value in nnx.to_flat_state(state):
        placed_on = set(value.get_value().sharding.device_set)
        if not placed_on <= devices:
            raise ValueError(
                f"parameter {'.'.join(map(str, path))} is on {sorted(d.id for d in placed_on)}, not on stage {stage}'s "
                f"devices {sorted(d.id for d in devices)}: place the model with sharding.shard_model first"
            )


class PipelinedModel:
    """A model placed by ``sharding.rules.param_placement`` on one replica's mesh, run stage by stage."""

    def __init__(
        self,
        model,
        mesh: Mesh,
        *,
        head_fn: HeadFn = greedy_head,
        compiler_options: CompilerOptions = None,
        token_rows: int | None = None,
        stable_step_outputs: bool = False,
        stable_stage_outputs: bool = False,
    ):
        """``token_rows``: pad the head's ``token_ids`` to this many rows, so they can feed a later step's pending
        tokens (``run(..., pending_tokens=...)``) through one program whatever bucket produced them.
        ``stable_step_outputs``: write the results into donated buffers; ``stable_stage_outputs``: the same for
        every other stage's hidden states (see the module docstring)."""
        check_single_replica(mesh)
        self.config = model.config
        self.head_fn = head_fn
        self.token_rows = token_rows
        self.compiler_options = compiler_options  # XLA options of the stage programs, per bucket (runner.xla_options)
        self.num_traces = 0  # incremented only when a stage program is traced (compiled) anew
        self.num_head_traces = 0  # likewise for the head program
        self._result_shape_cache: dict = {}  # (rows, head-argument shapes) -> the head's result shapes
        meshes = stage_meshes(mesh)
        ranges = stage_layer_ranges(self.config.num_layers, len(meshes))
        last = len(meshes) - 1
        self.stages = [
            self._build_stage(model, meshes, ranges, s, stable_step_outputs if s == last else stable_stage_outputs)
            for s in range(len(meshes))
        ]
        self._stage_placements = [replicated(stage.mesh) for stage in self.stages]  # each stage's step inputs
        self._head_placement = replicated(meshes[last])  # the head's inputs and outputs, on the last stage's devices
        self.head_results = ResultBuffers(stable_step_outputs, self._head_placement)  # the head's donated outputs
        self._head_program = self._compile_head()

    def _build_stage(self, model, meshes, ranges, index: int, stable_outputs: bool) -> Stage:
        """Stage ``index``; ``stable_outputs``: its outputs go into donated pooled buffers (``stage.results``)."""
        graphdef, params = _split_stage(model, meshes, ranges, index)
        mesh, is_last = meshes[index], index == len(meshes) - 1
        programs = self._compile(graphdef, params, mesh, is_last)
        results = ResultBuffers(stable_outputs, replicated(mesh))
        return Stage(mesh, ranges[index], graphdef, params, programs, results)

    # Sleep mode (jaxllm.engine.sleep_mode): every stage's parameter arrays out and back, the KV cache freed.
    def param_arrays(self) -> list[jax.Array]:
        return [array for stage in self.stages for array in stage.params.leaves]

    def set_param_arrays(self, arrays: list[jax.Array]) -> None:
        start = 0
        for stage in self.stages:
            count = len(stage.params.leaves)
            stage.params = dataclasses.replace(stage.params, leaves=list(arrays[start : start + count]))
            start += count

    def load_params(self, model) -> None:
        """Every stage's parameters from ``model``, built and placed as this pipeline's was."""
        meshes, ranges = [stage.mesh for stage in self.stages], [stage.layers for stage in self.stages]
        for index, stage in enumerate(self.stages):
            _, params = _split_stage(model, meshes, ranges, index)
            if params.treedef != stage.params.treedef:
                raise ValueError(f"the model's stage {index} parameters are not laid out as the pipeline's")
            stage.params = params

    def free_kv_cache(self) -> None:
        for stage in self.stages:
            for array in jax.tree.leaves(stage.kv_caches):
                array.delete()
            stage.kv_caches = None

    def _compile(self, graphdef, params: FlatState, mesh: Mesh, is_last: bool):
        rules = activation_rules(self.config, mesh)
        owner = weakref.proxy(self)  # the programs are this model's: a strong reference would keep it alive in a cycle

        def program(
            param_leaves, kv_caches, inputs, packed, pending_tokens, result_buffers, layout: PackedLayout, width
        ):
            # width: the prompt-logprob top-k of a last-stage call with prompt targets, else None
            owner.num_traces += 1
            md, logits_indices, prev_index, input_ids, targets = unpack(packed, layout)  # one copy
            if inputs is None:  # first stage: the token ids came in the packed buffer
                inputs = input_ids
            num_tokens = md.positions.shape[0]
            if inputs.shape[0] > num_tokens:  # the previous stage's stable output: ROW_SLACK rows past its own
                inputs = inputs[:num_tokens]
            if pending_tokens is not None:  # first stage: the previous step's samples, still on the device
                inputs = feed_pending_tokens(inputs, prev_index, pending_tokens)
            stage = nnx.merge(graphdef, params.unflatten(param_leaves))
            with activation_sharding(mesh, rules):  # the model's activation names -> sharding constraints
                out, kv_caches = stage_forward(stage, inputs, kv_caches, md, logits_indices, targets, width)
            if not is_last:
                return write_into(result_buffers, {"hidden": out})["hidden"], kv_caches
            if targets is None:
                return write_into(result_buffers, {"logits": out}), kv_caches
            logits, prompt_logprobs = out  # (the prompt logprobs are plain outputs: only the logits have a buffer)
            return write_into(result_buffers, {"logits": logits, **as_results(prompt_logprobs)}), kv_caches

        rep, kv = replicated(mesh), kv_cache_sharding(mesh)
        return ProgramsByOptions(
            program,
            self.compiler_options,
            donate_argnums=(1, 5),
            static_argnums=(6, 7),
            in_shardings=([leaf.sharding for leaf in params.leaves], kv, rep, rep, rep, rep),
            out_shardings=(rep, kv),
        )

    def _compile_head(self):
        owner = weakref.proxy(self)  # no cycle, as in _compile

        def head(logits, packed, pending_tokens, result_buffers, layout: PackedLayout, rows: int):
            # logits: the last stage's [rows, V] (a stable buffer: ROW_SLACK rows more); rows: the batch's rows;
            # pending_tokens: the vector the first stage took its pending tokens from (the step in flight's samples)
            owner.num_head_traces += 1
            head_args, in_flight_rows = unpack(packed, layout)
            in_flight = in_flight_output_tokens(pending_tokens, in_flight_rows)
            return write_into(result_buffers, owner._finish_head(logits[:rows], head_args, in_flight))

        here = self._head_placement
        return jax.jit(
            head,
            donate_argnums=(3,),
            static_argnums=(4, 5),
            in_shardings=here,
            out_shardings=here,
            compiler_options=sampler_options(self.compiler_options),
        )

    def _finish_head(self, logits, head_args, in_flight_tokens) -> dict:
        """(traced) The head's results from the last stage's logits, ``token_ids`` padded to ``token_rows``."""
        out = self.head_fn(logits, head_args, in_flight_tokens)
        if self.token_rows is not None:
            out = {**out, "token_ids": jnp.pad(out["token_ids"], (0, self.token_rows - out["token_ids"].shape[0]))}
        return out

    def _stage_output_shapes(self, stage: Stage, batch: StepBatch) -> dict:
        """The shapes of ``stage``'s outputs that get stable buffers: its hidden states, on the last stage its logits
        at the sampled rows."""
        if stage is not self.stages[-1]:
            return {"hidden": jax.ShapeDtypeStruct((batch.input_ids.shape[0], self.config.hidden_size), self._dtype)}
        return {"logits": jax.ShapeDtypeStruct((batch.logits_indices.shape[0], self.config.vocab_size), jnp.float32)}

    def _head_output_shapes(self, rows: int, head_args, layout: PackedLayout) -> dict:
        """The shapes of the head's results for ``rows`` rows (traced once per layout of its packed arguments, which
        holds their tree and each leaf's shape and dtype)."""
        key = (rows, layout)
        if key not in self._result_shape_cache:
            logits = jax.ShapeDtypeStruct((rows, self.config.vocab_size), jnp.float32)
            in_flight = jax.ShapeDtypeStruct((rows,), jnp.int32)
            self._result_shape_cache[key] = jax.eval_shape(self._finish_head, logits, head_args, in_flight)
        return self._result_shape_cache[key]

    @functools.cached_property
    def _dtype(self):
        """The hidden states' dtype (the embedding table's)."""
        return self.stages[0].state["embed_tokens"]["embedding"].get_value().dtype

    def release(self, results: Sequence[dict]) -> None:
        """Hands the head's result buffers of a ``run`` back once their values have been read (a no-op unless
        ``stable_step_outputs``); a later call of the same shapes donates them."""
        for result in results:
            self.head_results.release({k: v for k, v in result.items() if not k.startswith(RESULT_PREFIX)})

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype) -> None:
        """Zeroed K and V blocks ``[P, L, K, H]`` for every layer, each stage's layers on its own sub-mesh (grouped
        into few arrays per stage under ``JAXLLM_KV_ARRAY_MAX_BYTES``: ``jaxllm.models.kv_cache_layout``)."""
        for stage in self.stages:
            stage.kv_caches = None  # free the old cache first
            sharding = kv_cache_sharding(stage.mesh)
            stage.kv_caches = allocate_kv_cache(self.config, num_blocks, block_size, dtype, sharding, len(stage.layers))

    def run(
        self,
        batches: Sequence[StepBatch],
        head_args: Sequence | None = None,
        pending_tokens=None,
        prompt_targets: Sequence[np.ndarray] | None = None,
        prompt_logprob_width: int | None = None,
    ) -> list:
        """Dispatches every (micro)batch through every stage and the head; returns the head's results per batch (on
        device). ``prepare`` then ``launch``; the arguments are theirs, one entry per batch."""
        head_args = [None] * len(batches) if head_args is None else head_args
        prompt_targets = [None] * len(batches) if prompt_targets is None else prompt_targets
        calls = [
            self.prepare(batch, args, targets, prompt_logprob_width)
            for batch, args, targets in zip(batches, head_args, prompt_targets, strict=True)
        ]
        return self.launch(calls, pending_tokens)

    def prepare(
        self,
        batch: StepBatch,
        head_args=None,
        prompt_targets: np.ndarray | None = None,
        prompt_logprob_width: int | None = None,
    ) -> PreparedCall:
        """(host) ``batch``'s inputs for ``launch``: every stage's and the head's step arrays packed, the head's
        result shapes (``sharding.step_inputs``); touches no device, so the caller's thread may prepare a step while
        another launches the one before. ``head_args``: the head function's arguments; ``prompt_targets`` (``[T]``)
        with ``prompt_logprob_width``: the last stage also returns the prompt logprobs of those targets
        (``jaxllm.runner.prompt_logprobs``), through its program's prompt-logprob variant."""
        num_stages = len(self.stages)
        trees = [stage_arrays(batch, index, num_stages, prompt_targets) for index in range(num_stages)]
        *stages, head = [Packed.of(tree) for tree in [*trees, head_arrays(batch, head_args)]]
        rows = batch.logits_indices.shape[0]
        width = None if prompt_targets is None else prompt_logprob_width
        return PreparedCall(batch, stages, head, self._head_output_shapes(rows, head_args, head.layout), width)

    def launch(self, calls: Sequence[PreparedCall], pending_tokens=None) -> list:
        """Runs prepared (micro)batches through every stage and the head without waiting; returns the head's results
        per batch (on device).

        ``pending_tokens``: per batch, a padded ``token_ids`` of an earlier run (needs ``token_rows``) or None,
        gathered into the first stage's input ids where ``batch.prev_index`` points at them; a zero vector stands in
        where none are pending, so both cases share one program.
        """
        if self.stages[0].kv_caches is None:
            raise ValueError("no KV cache: call allocate_kv_cache first")
        pending_tokens = [None] * len(calls) if pending_tokens is None else pending_tokens
        read = tuple(p for p in pending_tokens if p is not None)  # earlier results this run reads: not for donating
        results = []
        for call, pending in zip(calls, pending_tokens, strict=True):
            *placed, head = place([*call.stages, call.head], [*self._stage_placements, self._head_placement])
            x = None  # the first stage's token ids ride in its packed inputs
            for index, stage in enumerate(self.stages):
                width = call.prompt_logprob_width if stage is self.stages[-1] else None
                pending_here = self._stage_pending_tokens(index, pending)
                out = self._call_stage(index, x, call.batch, placed[index], pending_here, width)
                if index > 0:  # the previous stage's hidden states, read by this call (a no-op unless stable)
                    self.stages[index - 1].results.release({"hidden": x})
                x = out
            logits = x.pop("logits")  # what is left: the prompt logprobs, when asked
            results.append({**self._call_head(logits, call, head, pending, read), **x})
            self.stages[-1].results.release({"logits": logits})  # read by the head's call
        return results

    def _head_call_args(self, logits, call: PreparedCall, head: Packed, pending_tokens=None, read_by_run=()) -> tuple:
        """The head program's arguments; ``pending_tokens``: the vector the batch's pending tokens come from (None:
        nothing pending); its result buffers hold none of ``read_by_run`` (results of an earlier run that this run
        reads as pending tokens)."""
        pending_tokens = self._no_in_flight_tokens if pending_tokens is None else pending_tokens
        rows = call.batch.logits_indices.shape[0]
        result_buffers = self.head_results.take(call.head_shapes, read_by_call=read_by_run)
        return logits, head.buffer, pending_tokens, result_buffers, head.layout, rows

    def _call_head(self, logits, call: PreparedCall, head: Packed, pending_tokens=None, read_by_run=()) -> dict:
        """The head program for ``call`` on ``logits``; ``head``: its packed inputs, placed."""
        return self._head_program(*self._head_call_args(logits, call, head, pending_tokens, read_by_run))

    def run_head(self, logits, batch: StepBatch, head_args, pending_tokens=None) -> dict:
        """The head (sampler) program on the last stage's ``logits`` for ``batch``, on its own (``launch`` runs it
        after the last stage; ``benchmarks/mesh_scaling.py`` times it alone)."""
        call = self.prepare(batch, head_args)
        (head,) = place([call.head], self._head_placement)
        return self._call_head(logits, call, head, pending_tokens)

    def warm_up_head(self, batch: StepBatch, head_args) -> None:
        """Compiles (and runs) the head program for ``batch``'s rows and ``head_args``' kind, on zero logits of its
        own placed as the stage programs give them: the logits pool feeds only the stage calls, which donate."""
        shape = self._head_logits(batch)
        logits = jnp.zeros(shape.shape, shape.dtype, device=self._head_placement)
        self.release([jax.block_until_ready(self.run_head(logits, batch, head_args))])

    def _head_logits(self, batch: StepBatch) -> jax.ShapeDtypeStruct:
        """The logits the last stage hands the head for ``batch``: ``ROW_SLACK`` rows past the batch's in a stable
        buffer (``stable_step_outputs``), on the head's devices."""
        shape = self._stage_output_shapes(self.stages[-1], batch)["logits"]
        rows = self.stages[-1].results.buffer_rows(shape.shape[0])
        return jax.ShapeDtypeStruct((rows, shape.shape[1]), shape.dtype, sharding=self._head_placement)

    @property
    def pending_rows(self) -> int:
        """The rows of a result's ``token_ids`` that can feed pending tokens (``token_rows``, plus the stable buffers'
        slack)."""
        return self.head_results.buffer_rows(self.token_rows)

    def _stage_pending_tokens(self, index: int, pending_tokens=None):
        """What stage ``index``'s program takes as pending tokens: the first stage ``pending_tokens``, or zeros shaped
        as a fed vector when none are pending (one program whether or not tokens are pending); later stages None."""
        if index > 0:
            return None
        if pending_tokens is None and self.token_rows is not None:
            return self._no_pending_tokens
        return pending_tokens

    @functools.cached_property
    def _no_pending_tokens(self) -> jax.Array:
        """The first stage's pending-token vector when nothing is pending: zeros shaped as a fed one."""
        return _zero_pending_tokens(self.pending_rows, replicated(self.stages[0].mesh))

    @functools.cached_property
    def _no_in_flight_tokens(self) -> jax.Array:
        """The same for the head, on its devices (a vector of one without ``token_rows``: nothing can be fed)."""
        return _zero_pending_tokens(1 if self.token_rows is None else self.pending_rows, self._head_placement)

    def _stage_call_args(
        self, index: int, inputs, batch: StepBatch, placed: Packed, pending_tokens=None, width=None
    ) -> tuple:
        """The stage program's arguments: ``placed``, its packed step arrays (``prepare``), and ``inputs``, the
        previous stage's hidden states (None on the first stage, whose token ids are in ``placed``), moved onto this
        stage's devices. ``width``: the last stage's prompt-logprob top-k when it computes prompt logprobs."""
        stage, here = self.stages[index], self._stage_placements[index]
        if isinstance(inputs, jax.Array):  # the previous stage's hidden states, onto this stage's devices
            inputs = jax.device_put(inputs, here)
        if pending_tokens is not None and not pending_tokens.sharding.is_equivalent_to(here, 1):
            pending_tokens = jax.device_put(pending_tokens, here)  # sampled on the last stage's devices
        result_buffers = stage.results.take(self._stage_output_shapes(stage, batch))
        return (
            stage.params.leaves,
            stage.kv_caches,
            inputs,
            placed.buffer,
            pending_tokens,
            result_buffers,
            placed.layout,
            width,
        )

    def _call_stage(self, index: int, inputs, batch: StepBatch, placed: Packed, pending_tokens=None, width=None):
        stage = self.stages[index]
        program = stage.programs.for_tokens(batch.token_bucket)
        out, stage.kv_caches = program(*self._stage_call_args(index, inputs, batch, placed, pending_tokens, width))
        return out

    def run_stage(self, stage: Stage, inputs, batch: StepBatch, pending_tokens=None):
        """``stage``'s program for ``batch`` on its own, on ``inputs`` (the previous stage's outputs; ignored on the
        first stage, which reads the batch's token ids), updating the stage's KV cache; ``launch`` chains them,
        ``benchmarks/mesh_scaling.py`` times each alone."""
        index = next(i for i, s in enumerate(self.stages) if s is stage)
        placed = self._place_stage_inputs(index, batch)
        pending = self._stage_pending_tokens(index, pending_tokens)  # the program ``launch`` calls, not a variant
        return self._call_stage(index, None if index == 0 else inputs, batch, placed, pending)

    def _place_stage_inputs(self, index: int, batch: StepBatch) -> Packed:
        """Stage ``index``'s step arrays for ``batch`` alone, packed and on its devices."""
        packed = Packed.of(stage_arrays(batch, index, len(self.stages)))
        return place([packed], self._stage_placements[index])[0]

    def lower_stage(self, index: int, batch: StepBatch) -> jax.stages.Lowered:
        """Stage ``index``'s program lowered for ``batch``'s bucket (``.compile().as_text()`` shows its collectives)."""
        stage = self.stages[index]
        pending = self._stage_pending_tokens(index)
        inputs = None
        if index > 0:  # a later stage takes hidden states [T, D] (a stable one: ROW_SLACK rows more), not token ids
            rows = self.stages[index - 1].results.buffer_rows(batch.input_ids.shape[0])
            inputs = jax.ShapeDtypeStruct((rows, self.config.hidden_size), self._dtype, sharding=replicated(stage.mesh))
        args = self._stage_call_args(index, inputs, batch, self._place_stage_inputs(index, batch), pending)
        lowered = stage.programs.for_tokens(batch.token_bucket).lower(*args)
        *_, result_buffers, _layout, _width = args
        if result_buffers is not None:
            stage.results.release(result_buffers)  # (lowering runs nothing: the buffers are free again)
        return lowered

    def lower_head(self, batch: StepBatch, head_args=None) -> jax.stages.Lowered:
        """The head program lowered for ``batch``'s rows and ``head_args``' kind."""
        call = self.prepare(batch, head_args)
        (head,) = place([call.head], self._head_placement)
        args = self._head_call_args(self._head_logits(batch), call, head)
        lowered = self._head_program.lower(*args)
        if args[3] is not None:
            self.head_results.release(args[3])
        return lowered
