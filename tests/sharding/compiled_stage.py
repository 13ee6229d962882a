"""Reading a mesh engine's compiled stage and head programs: which instructions take a given entry parameter."""

from __future__ import annotations

import re

from jaxllm.runner.step_batch import padding_step_batch


def compiled_last_stage(runner) -> str:
    """The optimized HLO text of ``runner``'s last stage program for its smallest bucket."""
    return compiled_stage(runner, runner.pipeline.num_stages - 1)


def _smallest_batch(runner):
    bucket = runner.config.token_buckets[0]
    rows = runner.config.request_rows_for(bucket)
    return padding_step_batch(bucket, rows, runner.config.max_blocks_per_request), rows


def compiled_stage(runner, index: int) -> str:
    """The optimized HLO text of ``runner``'s stage ``index`` program for its smallest bucket."""
    batch, _ = _smallest_batch(runner)
    return runner.pipeline.lower_stage(index, batch).compile().as_text()


def compiled_head(runner) -> str:
    """The optimized HLO text of ``runner``'s head program for its smallest bucket's rows (greedy)."""
    batch, rows = _smallest_batch(runner)
    return runner.pipeline.lower_head(batch, runner.build_head_args([], rows, 0, 0)).compile().as_text()


def parameter_readers(compiled_hlo: str, op_name: str) -> list[str]:
    """The entry computation's instructions that take the parameter whose metadata ``op_name`` is ``op_name``."""
    entry = compiled_hlo[compiled_hlo.index("\nENTRY") :].splitlines()[1:]
    quoted = re.escape(op_name).replace("'", r"\\*'")  # XLA escapes the quotes of pytree keys
    parameter = re.compile(r'\s*(%\S+) = \S+ parameter\(\d+\).*op_name="' + quoted + '"')
    (name,) = [m.group(1) for line in entry if (m := parameter.match(line))]
    return [line.strip() for line in entry if re.search(re.escape(name) + r"[,)]", line) and " parameter(" not in line]
