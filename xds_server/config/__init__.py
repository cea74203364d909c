"""Stage 1, config: the snapshot file (and the admin overlay over it) in, a validated Config out.

`types` (the frozen dataclasses everything downstream reads), `reader` (YAML to Config,
every problem named by file and path), `problems` (the problem-collecting getters the
reader is built from), `raw` (the `envoy:` escape hatch of hand-written resources),
`policies` (a pool's weight policy, and the allow-list custom policy modules need),
`file_source` (the file as a live source: load, watch, hand each good Config on),
`overlay` (the admin API's drains and endpoint edits over the file) and `state_file`
(where the overlay persists).
"""
