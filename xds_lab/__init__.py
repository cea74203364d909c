"""The lab: everything that exists to demonstrate, simulate or test the product.

`simulator/` (vLLM-like model servers), `edits_demo` and `weights_demo` (`xds-lab demo`),
`loadgen` (open-loop load), `envoy_process` (a real Envoy as a child process),
`envoy_rig` (the control plane plus Envoy for demos and tests), `upstream` (a tiny HTTP
upstream), `lifecycle` (async start/stop). The product (`xds_server`, `lrs`) never imports it.
"""
