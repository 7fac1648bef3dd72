"""The server: OpenAI-compatible HTTP API, request scheduler, batched decoding, the engine that loads once, metrics."""
