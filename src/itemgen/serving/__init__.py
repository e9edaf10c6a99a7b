"""The HTTP server: FastAPI routes, the micro-batching worker, the batched model engine and
sessions. Imports itemgen.api and below."""
