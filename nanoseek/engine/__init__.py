"""The inference engine: paged latent KV cache, prefix caching, continuous batching, sampling."""

from .async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from .llm import LLM, LLMEngine
from .sampling_params import InvalidRequestError, OutputFilter, SamplingParams
from .sequence import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["AsyncLLM", "EngineDeadError", "RequestFailedError", "LLM", "LLMEngine", "OutputFilter", "SamplingParams", "InvalidRequestError", "RequestOutput", "CompletionOutput",
           "RequestMetrics"]
