"""The inference engine: paged latent KV cache, prefix caching, continuous batching, sampling."""

from .async_llm import AsyncLLM, EngineDeadError
from .llm import LLM, LLMEngine
from .sampling_params import InvalidRequestError, SamplingParams
from .sequence import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["AsyncLLM", "EngineDeadError", "LLM", "LLMEngine", "SamplingParams", "InvalidRequestError", "RequestOutput", "CompletionOutput",
           "RequestMetrics"]
