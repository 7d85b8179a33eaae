"""The HTTP server: OpenAI- and DeepSeek-compatible API, policy layer, at-cost pricing, web chat page."""
