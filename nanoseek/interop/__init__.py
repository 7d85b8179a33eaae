"""Interoperability with other runtimes: GGUF files for llama.cpp and Ollama."""
