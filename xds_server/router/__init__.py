"""The body router: Envoy's ext_proc requests in, a model header (or a refusal) out.

`body` (reading `model` from an OpenAI-style JSON body), `ext_proc` (the external processor
service, answers encoded once per config), `standalone` (`xds-server body-router`: the
router as its own process, following the snapshot file).
"""
