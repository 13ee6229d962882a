"""On-device sampling: SamplingMetadata built on the host each step, ``sample`` run inside the jitted step."""

from jaxllm.sampling.builder import SamplingMetadataBuilder, build_sampling_metadata
from jaxllm.sampling.metadata import SamplingMetadata
from jaxllm.sampling.sampler import SamplerOutput, in_flight_output_tokens, sample, seeded_request_key

__all__ = [
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingMetadataBuilder",
    "build_sampling_metadata",
    "in_flight_output_tokens",
    "sample",
    "seeded_request_key",
]
