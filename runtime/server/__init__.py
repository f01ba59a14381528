"""The HTTP server over bundles (`python -m runtime.serve`): an OpenAI-compatible API with
dynamic batching, admission control and Prometheus metrics, in process or on Ray Serve."""
