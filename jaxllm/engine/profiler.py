"""``LLM.start_profile()`` / ``stop_profile()`` (vLLM's): a JAX profiler trace of whatever the engine runs in between
(the step programs' device kernels on an accelerator, XLA's and the engine's host events), written under
``$JAXLLM_PROFILER_DIR`` (vLLM's ``$VLLM_TORCH_PROFILER_DIR`` is read too, so a vLLM script's environment works), in
``plugins/profile/<run>/``: an ``.xplane.pb`` for TensorBoard's profile plugin / XProf and a ``.trace.json.gz`` for
Perfetto. JAX records one trace per process at a time."""

from __future__ import annotations

import logging
import os
import pathlib

import jax

logger = logging.getLogger(__name__)

PROFILER_DIR_VARIABLES = ("JAXLLM_PROFILER_DIR", "VLLM_TORCH_PROFILER_DIR")


def profiler_directory() -> pathlib.Path:
    """The trace directory from the environment; ValueError when neither variable is set."""
    for name in PROFILER_DIR_VARIABLES:
        if os.environ.get(name):
            return pathlib.Path(os.environ[name]).expanduser()
    raise ValueError(
        f"profiling needs a trace directory: set {PROFILER_DIR_VARIABLES[0]} (or vLLM's {PROFILER_DIR_VARIABLES[1]}) "
        "before calling start_profile()"
    )


class EngineProfiler:
    def __init__(self) -> None:
        self.directory: pathlib.Path | None = None  # where the trace being recorded goes; None when not recording

    def start(self, profile_prefix: str | None = None) -> None:
        """Starts recording into the profiler directory (in its subdirectory ``profile_prefix``, when given)."""
        if profile_prefix is not None and (not isinstance(profile_prefix, str) or not profile_prefix):
            raise ValueError(f"profile_prefix must be a non-empty str or None, got {profile_prefix!r}")
        if self.directory is not None:
            raise ValueError(f"a profile is already being recorded into {self.directory}; call stop_profile() first")
        directory = profiler_directory() / (profile_prefix or "")
        jax.profiler.start_trace(str(directory), create_perfetto_trace=True)
        self.directory = directory
        logger.info("profiling into %s", directory)

    def stop(self) -> pathlib.Path:
        """Stops recording and writes the trace; returns its directory."""
        if self.directory is None:
            raise ValueError("no profile is being recorded: call start_profile() first")
        jax.profiler.stop_trace()
        directory, self.directory = self.directory, None
        logger.info("profile written under %s", directory)
        return directory
