"""The snapshot file's typed form: what a valid file says, as frozen dataclasses.

Everything downstream (resources, the overlay, the admin API) reads these types; only
the reader builds them, so a Config always passed every check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from lrs.weights.params import Params
from lrs.weights.shedding import Shedding

__all__ = [
    "BODY_ROUTER_ADDRESS",
    "BODY_ROUTER_PORT",
    "CSWRR",
    "DEFAULT_GROUP",
    "FAILURE_MODES",
    "LB_POLICIES",
    "MAX_BODY_BYTES",
    "MAX_RAW_VALUES",
    "MAX_ROUTER_TIMEOUT",
    "MAX_SECONDS",
    "MIN_CONNECT_TIMEOUT",
    "MODEL_HEADER",
    "UINT32_MAX",
    "WEIGHTINGS",
    "BodyRouterSettings",
    "Config",
    "Endpoint",
    "KubernetesRef",
    "Listener",
    "NodeGroup",
    "Pool",
    "Problem",
    "RawResources",
    "Route",
    "SnapshotError",
    "SplitTarget",
]

DEFAULT_GROUP: Final = "default"
#: client_side_weighted_round_robin: Envoy weighs endpoints itself from the ORCA headers of
#: responses (qps / utilization), ignoring EDS weights.
CSWRR: Final = "client_side_weighted_round_robin"
LB_POLICIES: Final = ("round_robin", "least_request", CSWRR)
WEIGHTINGS: Final = ("static", "orca")
MODEL_HEADER: Final = "x-gateway-model-name"
#: Where Envoy finds the body router when the file names no address (`xds-server serve` runs
#: one there; `--router-port` moves it, and then the generated config follows).
BODY_ROUTER_ADDRESS: Final = "127.0.0.1"
BODY_ROUTER_PORT: Final = 18001
FAILURE_MODES: Final = ("closed", "open")
#: The router takes a whole body in one gRPC message; its server accepts 16 MiB messages.
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
#: Envoy's ext_proc message_timeout may not exceed an hour.
MAX_ROUTER_TIMEOUT: Final = 3600.0
UINT32_MAX: Final = 2**32 - 1
#: The largest protobuf Duration, in seconds: anything above cannot be encoded.
MAX_SECONDS: Final = 315_576_000_000
#: Envoy requires connect_timeout > 0; below a millisecond it is a typo, not a setting.
MIN_CONNECT_TIMEOUT: Final = 0.001
#: Raw resources are walked by json_format; bound them so a YAML alias bomb cannot stall us.
MAX_RAW_VALUES: Final = 100_000

# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model server; address is a normalized IP literal so keys compare reliably."""

    address: str
    port: int
    zone: str = ""
    weight: int = 1
    #: Set by an admin API drain (never by the file): Envoy sends it no new requests.
    draining: bool = False

    @property
    def key(self) -> str:
        """The `address:port` form the admin API uses in URLs."""
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class KubernetesRef:
    """Where a pool's endpoints come from in Kubernetes (`kubernetes:`): the EndpointSlices
    of a Service (`service`, with the slice port `port` by name or number), or the ready
    Pods an InferencePool selects (`inference_pool`, its targetPorts)."""

    namespace: str
    service: str | None = None
    port: str | int | None = None
    inference_pool: str | None = None


@dataclass(frozen=True, slots=True)
class Pool:
    """A set of interchangeable model servers: one Envoy cluster fed over EDS."""

    name: str
    lb_policy: str
    weighting: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = 1.0
    policy: str = "headroom"  # weighting: orca only: "headroom" or "module:Class"
    orca: Params = field(default_factory=Params)  # the policy parameters (`orca:`)
    #: Endpoints from Kubernetes instead of `endpoints:` (xds_server.kubernetes fills them).
    kubernetes: KubernetesRef | None = None
    #: HTTP/2 (h2c) to the upstreams: an InferencePool's `appProtocol: kubernetes.io/h2c`.
    http2: bool = False
    #: `shedding:` (weighting: orca only): when every endpoint is saturated, Envoy answers a
    #: share of the requests with 503 itself; None: never.
    shedding: Shedding | None = None


@dataclass(frozen=True, slots=True)
class SplitTarget:
    """One pool of a traffic split and its relative weight (Envoy weighted_clusters)."""

    pool: str
    weight: int


@dataclass(frozen=True, slots=True)
class Route:
    """Either a model route (header match) or a prefix route; timeout 0 disables it.

    It sends to one `pool`, or (pool None) shares traffic between the pools of `split`
    by weight: canaries and LoRA-adapter rollouts of one model.
    """

    pool: str | None
    model: str | None = None
    prefix: str | None = None
    timeout: float = 300.0
    split: tuple[SplitTarget, ...] = ()

    @property
    def pools(self) -> tuple[str, ...]:
        """Every pool this route can send to."""
        return (self.pool,) if self.pool is not None else tuple(t.pool for t in self.split)


@dataclass(frozen=True, slots=True)
class Listener:
    """body_routing: Envoy asks the body router for each request's model (ext_proc)."""

    name: str
    port: int
    address: str = "0.0.0.0"
    routes: tuple[Route, ...] = ()
    body_routing: bool = False

    @property
    def models(self) -> tuple[str, ...]:
        """The model names its routes match, in file order."""
        return tuple(route.model for route in self.routes if route.model is not None)

    @property
    def has_fallback(self) -> bool:
        """Whether a prefix route catches requests that name no model."""
        return any(route.model is None for route in self.routes)


@dataclass(frozen=True, slots=True)
class BodyRouterSettings:
    """How Envoy reaches and uses the body router (the `body_router:` section).

    address/port None: the file names no router, so the control plane's own is used.
    failure_mode "closed" answers 503 while the router is unreachable; "open" lets
    requests through unrouted by body (to a header-matched or prefix route), which can
    send a request to the wrong model's pool: closed is the default for that reason.
    """

    address: str | None = None
    port: int | None = None
    timeout: float = 1.0
    failure_mode: str = FAILURE_MODES[0]
    max_body_bytes: int = 4 * 1024 * 1024
    #: With TLS on the router's port: the directory on the Envoy host holding the SDS files
    #: `xds-server bootstrap --sds-dir` wrote; Envoy reaches the router with that client
    #: certificate and CA. None: plaintext (a router beside Envoy on loopback).
    tls_sds_dir: str | None = None

    def target(self, default: tuple[str, int]) -> tuple[str, int]:
        """The router's address, the file's where it names one, else `default`."""
        if self.address is None and self.port is None:
            return default
        return (self.address or BODY_ROUTER_ADDRESS, self.port or BODY_ROUTER_PORT)


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """What the Envoys of some node.cluster values get; pools include every routed pool."""

    name: str
    node_clusters: tuple[str, ...]
    listeners: tuple[str, ...]
    pools: tuple[str, ...]
    #: With mTLS, the certificate identities (SPIFFE IDs, URI or DNS SANs; `*` globs) that
    #: may claim this group; empty: any client the CA vouches for. Ignored without mTLS.
    identities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RawResources:
    """Hand-written Envoy resources from the `envoy:` escape hatch, served to every group."""

    clusters: tuple[cluster_pb2.Cluster, ...] = ()
    listeners: tuple[listener_pb2.Listener, ...] = ()
    routes: tuple[route_pb2.RouteConfiguration, ...] = ()
    endpoints: tuple[endpoint_pb2.ClusterLoadAssignment, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """A validated snapshot file; node_groups always ends with the "default" group."""

    source: str
    listeners: tuple[Listener, ...]
    pools: tuple[Pool, ...]
    node_groups: tuple[NodeGroup, ...]
    raw: RawResources
    body_router: BodyRouterSettings = BodyRouterSettings()

    def group_for(self, node_cluster: str) -> NodeGroup:
        """Nodes whose cluster no group claims get the default group."""
        for group in self.node_groups:
            if node_cluster in group.node_clusters:
                return group
        return self.node_groups[-1]

    @property
    def orca_pools(self) -> tuple[Pool, ...]:
        """The pools whose weights come from load reports (`weighting: orca`)."""
        return tuple(pool for pool in self.pools if pool.weighting == "orca")

    def pool(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)

    def listener(self, name: str) -> Listener:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)


class Problem(NamedTuple):
    """One thing wrong with a snapshot file, located so an editor can jump to it."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}"


class SnapshotError(Exception):
    """A snapshot file that must not be served, with every problem found in it."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))
