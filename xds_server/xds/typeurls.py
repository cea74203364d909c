"""xDS type URLs and the order in which ADS delivers them.

Clusters go before endpoints and listeners before routes, so that Envoy never
warms a cluster or listener whose dependencies are not on their way yet.
"""

from typing import Final

__all__ = ["CLUSTER", "ENDPOINT", "FULL_STATE", "LISTENER", "ORDER", "ROUTE", "SHORT_NAMES"]

CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

#: ADS push order.
ORDER: Final = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

#: Types whose SotW responses always carry the full set (LDS, CDS); the others
#: (EDS, RDS) are requested by name and may be sent one changed resource at a time.
FULL_STATE: Final = frozenset({CLUSTER, LISTENER})

SHORT_NAMES: Final = {
    CLUSTER: "clusters",
    ENDPOINT: "endpoints",
    LISTENER: "listeners",
    ROUTE: "routes",
}
