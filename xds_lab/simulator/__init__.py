"""A vLLM-like model server to put behind Envoy: OpenAI API, continuous batching, ORCA, metrics.

Real HTTP with load behaviour close enough to vLLM's that load-aware balancing can be
measured against it, on a laptop: no GPU, no model, the engine sleeps for simulated time.

Layout: `options` (the parameters, the fast/slow/small profiles, CLI flags), `batching` (the
continuous-batching engine: queues, KV cache, clock), `steps` (its two models: realistic
chunked prefill, and the legacy deterministic one), `sequence` (one request inside it),
`variation` (the realistic model's seeded randomness), `openai` (request parsing and response
shapes), `orca` (the `endpoint-load-metrics` header, as vLLM sends it or richer), `metrics`
(vLLM's Prometheus names), `model_server` (`ModelServer`: the aiohttp app), `run`
(`xds-lab simulate`), `process` (simulators in a child process, driven over their admin API).
"""
