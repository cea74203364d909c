"""Stage 3, xDS: serialized resources in, ADS / per-type discovery streams out (SotW and Delta).

`typeurls` (the four resource types), `cache` (each node group's resources, serialized
once per version and shared by every stream), `clients` (who is connected, what each has
ACKed or NACKed), `stream` (what both protocol variants share), `sotw` and `delta` (the two
variants), `services` (the gRPC handlers). Nothing here knows how resources are built.
"""
