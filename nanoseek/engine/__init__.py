"""The inference engine: paged latent KV cache, prefix caching, continuous batching, sampling."""

from .llm import LLM, LLMEngine
from .sampling_params import InvalidRequestError, SamplingParams
from .sequence import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["LLM", "LLMEngine", "SamplingParams", "InvalidRequestError", "RequestOutput", "CompletionOutput",
           "RequestMetrics"]
