"""The load loop: Envoy's LRS reports in, per-endpoint load signals and weights out.

`load_reporting_service` (the gRPC LoadReportingService), `wire` (the trimmed message
classes reports are parsed as), `pacing` (the reporting interval that follows ingest CPU),
`spread` (which pools each stream is asked to report, so a big fleet reports each pool a
few times, not once per Envoy),
`load_store` (windows per cluster / locality / endpoint, merged across reporters),
`load_window` (the time-bucketed series and per-reporter state the store keeps),
`contract` (constants shared with the host: maximum weight, ORCA header, raw-bytes
serializer) and `weights/` (signals, parameters, the policy interface, the headroom
policy and the engine that runs policies and hands weights to whoever publishes them).

Imports nothing from `xds_server`: the host hands in what the loop needs.
"""
