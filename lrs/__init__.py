"""Load reporting: Envoy's LRS streams in, merged per-endpoint load signals out, weights computed.

Layout: `service` (the gRPC LoadReportingService), `wire` (the trimmed message classes
reports are parsed as), `pacing` (the reporting interval that follows ingest CPU), `store`
(windows per cluster / locality / endpoint, merged across reporters), `signals` (the types
the store hands to policies), `policy` (turning signals into endpoint and locality weights).
"""
