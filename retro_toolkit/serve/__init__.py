"""Serving a trained model over HTTP: the request schema (api), the batching worker (engine),
the endpoints (app). `retro-run serve` starts it."""
