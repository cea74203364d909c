"""Stage 2, Envoy resources: a Config (plus the weights in force) in, Envoy protos out.

`build` turns a Config into the Listener, RouteConfiguration, Cluster and
ClusterLoadAssignment of each node group; it never touches gRPC. `publisher` is the one
path from a Config or a weight change into the resource cache.
"""
