"""The control plane process: one asyncio loop runs xDS (gRPC), the admin API and the watcher."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
from aiohttp import web

from lrs.load_reporting_service import LoadReportingService
from lrs.load_store import LoadStore
from lrs.spread import REPORTERS_PER_POOL
from lrs.weights.engine import Loads, WeightEngine
from lrs.weights.signals import PoolWeights
from xds_server.admin import AdminApi, start_admin
from xds_server.admin.auth import resolve_read_token, resolve_token
from xds_server.admin.hosts import allowed_hosts
from xds_server.admin.tls import admin_tls
from xds_server.admission import Admission, ClientLimits
from xds_server.config.file_source import FileSource
from xds_server.config.state_file import OverlayState
from xds_server.config.types import Config
from xds_server.fleet import FleetView, LoadProvider
from xds_server.grpc_server import start_grpc_server
from xds_server.kubernetes.collector import KubernetesCollector
from xds_server.kubernetes.source import KubernetesOptions, KubernetesSource
from xds_server.metrics import Metrics
from xds_server.replicas.replication import Replication
from xds_server.resources.publisher import Publisher
from xds_server.router.ext_proc import BodyRouter
from xds_server.tls import ServerTls, TlsFiles, identity_allowed
from xds_server.xds.cache import ResourceCache
from xds_server.xds.clients import ClientRegistry
from xds_server.xds.services import DiscoveryServices
from xds_server.xds.stream import Stream

__all__ = ["ControlPlane", "Settings"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Settings:
    snapshot: Path
    host: str = "127.0.0.1"
    xds_port: int = 18000
    admin_port: int = 8080
    admin_host: str = "127.0.0.1"
    #: Seconds between checks of the snapshot file's identity, for changes no file event
    #: reports (NFS, a bind mount edited outside); events are followed at once.
    watch_interval: float = 0.2
    state: Path | None = None  # where admin API changes persist; None keeps them in memory
    admin_token_file: Path | None = None  # else $XDS_ADMIN_TOKEN; neither: changes refused
    admin_read_token_file: Path | None = None  # else $XDS_ADMIN_READ_TOKEN; neither: reads open
    admin_tls_cert: Path | None = None  # with admin_tls_key: HTTPS, re-read when they change
    admin_tls_key: Path | None = None
    admin_allowed_hosts: tuple[str, ...] = ()  # Host names answered; () = by admin_host
    admin_debounce: float = 0.05  # API changes within this many seconds publish together
    router_port: int = 18001  # the body router (ext_proc); 0 picks a free port
    lrs_interval: float = 1.0  # seconds between an Envoy's load reports
    lrs_cpu_budget: float = 0.5  # cores of report merging before reporters are slowed down
    #: Spread reporting: each pool asked of this many Envoys (lrs.spread); None: of all.
    lrs_reporters_per_pool: int | None = REPORTERS_PER_POOL
    weight_tick: float = 0.25  # seconds between weight recomputations
    #: Modules (and their submodules) whose custom weight policies the file may name;
    #: others are refused before they are imported (--allow-policy-module).
    allowed_policy_modules: tuple[str, ...] = ()
    #: TLS on the gRPC ports (xDS + LRS, body router); with a client CA, mTLS: client
    #: certificates required, node groups bound to their identities.
    tls: TlsFiles | None = None
    limits: ClientLimits = field(default_factory=ClientLimits)  # per-client limits
    #: On SIGTERM, open streams are closed spread over this many seconds (with jitter) so
    #: their Envoys reconnect to other replicas gradually, not all at once.
    drain_period: float = 8.0
    #: How often the published weights are written to the state file (when one is given).
    weights_save_interval: float = 5.0
    #: Replicas: share the overlay, load and weights through this Redis (redis://...).
    redis: str | None = None
    redis_prefix: str = "xds"  # key prefix: several fleets can share one Redis
    lease_ttl: float = 3.0  # seconds a leader's lease lasts without renewal
    #: Pools with `kubernetes:` take their endpoints from the cluster (serve --kubernetes).
    kubernetes: KubernetesOptions | None = None


class ControlPlane:
    """Owns every part; start() brings them up in dependency order, stop() in reverse."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = ResourceCache()
        self.registry = ClientRegistry()
        self.publisher = Publisher(self.cache)
        self.store = LoadStore(window=max(2.0, 2 * settings.lrs_interval))
        self.replication: Replication | None = None
        if settings.redis is not None:
            self.replication = Replication(
                settings.redis,
                self.publisher,
                self.store.pool_load,
                lambda: (
                    [p.name for p in self.publisher.config.orca_pools]
                    if self.publisher.config
                    else []
                ),
                settings.lrs_interval,
                settings.redis_prefix,
                settings.lease_ttl,
            )
            self.overlay: OverlayState = self.replication.overlay
            self.replication.overlay.on_change = self.source_publish
        else:
            self.overlay = OverlayState(settings.state)
        #: The file's config, Kubernetes pools filled in (with --kubernetes), overlay on top.
        self.kubernetes: KubernetesSource | None = None
        served: Callable[[Config], Config] = self.overlay.apply
        if settings.kubernetes is not None:
            self.kubernetes = KubernetesSource(settings.kubernetes, self.source_publish)
            served = self._with_kubernetes
        self.source = FileSource(
            settings.snapshot,
            self.publisher.publish_config,
            served,
            settings.allowed_policy_modules,
        )
        self.fleet = FleetView(self.publisher, self.source, self.overlay)
        if self.kubernetes is not None:
            self.fleet.fill = self.kubernetes.fill
        self.metrics = Metrics(self.cache, self.registry, self.fleet)
        self._admin_api: AdminApi | None = None
        self.xds_port = settings.xds_port
        self.admin_port = settings.admin_port
        self._grpc: grpc.aio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.body_router = BodyRouter(self.metrics.registry)
        self.publisher.on_config.append(self.body_router.update)
        self.router_port = settings.router_port
        self._router: grpc.aio.Server | None = None
        #: Read at start(); until then (and without --tls-*) the ports are plaintext.
        self.tls: ServerTls | None = None
        self.shutting_down = False
        self.admission = Admission(settings.limits, mutual=settings.tls is not None)
        self.lrs = LoadReportingService(
            self.store,
            self._lrs_clusters,
            settings.lrs_interval,
            cpu_budget=settings.lrs_cpu_budget,
            gate=self.admission.gate,
            authorize=self._authorize,
            max_report_bytes=settings.limits.max_lrs_request_bytes,
            reporters_per_pool=settings.lrs_reporters_per_pool,
        )
        loads: Loads = self.store.pool_load
        if self.replication is not None:
            loads = self.replication.load.loads
        self.engine = WeightEngine(loads, self._publish_weights, settings.weight_tick)
        self.metrics.observe_control_loop(self.lrs, self.engine)
        self.metrics.observe_trust(self.admission, self.lrs, lambda: self.tls)
        if self.replication is not None:
            self.metrics.observe_replicas(self.replication)
        if self.kubernetes is not None:
            self.metrics.registry.register(KubernetesCollector(self.kubernetes))
        self.publisher.on_config.append(self._follow_config)
        self.observe_load(lambda pool: loads(pool, time.monotonic()), lambda: self.store.reports)
        self._engine_task: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None

    async def source_publish(self) -> None:
        """Serve the file with the overlay in force again (another replica changed it, or
        Kubernetes did)."""
        await self.source.publish()

    def _with_kubernetes(self, config: Config) -> Config:
        """What is served: the file's config, its Kubernetes pools' endpoints from the
        cluster, the admin overlay over them (drains apply as to file endpoints)."""
        assert self.kubernetes is not None
        self.kubernetes.follow(config)
        return self.overlay.apply(self.kubernetes.fill(config))

    def _publish_weights(self, pool: str, weights: PoolWeights) -> None:
        if self.replication is not None:
            self.replication.publish(pool, weights)  # served when the table announces it
            return
        self.publisher.publish_weights(pool, weights)
        self.overlay.record_weights(pool, weights)

    async def _save_weights(self) -> None:
        """Keep the state file's weight table current (when there is a state file)."""
        while True:
            await asyncio.sleep(self.settings.weights_save_interval)
            await self._flush_weights()

    async def _flush_weights(self) -> None:
        try:
            await self.overlay.flush_weights()
        except OSError as err:
            log.error("cannot write the weights to the state file %s: %s", self.overlay.path, err)

    def _authorize(self, node_cluster: str, identities: tuple[str, ...] | None) -> str | None:
        """Why a client with these certificate identities may not claim `node_cluster`'s
        group, or None. Without mTLS (identities None) every claim stands."""
        config = self.publisher.config
        if identities is None or config is None:
            return None
        group = config.group_for(node_cluster)
        if identity_allowed(group.identities, identities):
            return None
        return (
            f"node.cluster {node_cluster!r} selects node group {group.name!r}, which "
            f"identities {list(identities)} may not claim (allowed: {list(group.identities)})"
        )

    def _lrs_clusters(self, node_cluster: str) -> list[str]:
        """Load reports are asked for the load-weighted pools of the node's group only:
        every reported endpoint costs ingest time, and only those pools use them."""
        config = self.publisher.config
        if config is None:
            return []
        group = config.group_for(node_cluster)
        orca = {pool.name for pool in config.orca_pools}
        return [p for p in group.pools if p in orca]

    def _follow_config(self, config: Config) -> None:
        self.store.set_known({p.name: [e.key for e in p.endpoints] for p in config.orca_pools})
        self.engine.configure(config.orca_pools)
        self.lrs.clusters_changed()
        routed = [x.name for x in config.listeners if x.body_routing]
        own_router = config.body_router.target(("", 0)) == ("", 0)
        if self.tls is not None and routed and own_router and not config.body_router.tls_sds_dir:
            log.warning(
                "listeners %s route by body through this process's router, which speaks TLS "
                "only: set body_router.tls_sds_dir to the SDS folder of the Envoys' bootstrap, "
                "or run `xds-server body-router` beside each Envoy",
                routed,
            )

    async def start(self) -> None:
        """Raises SnapshotError when the initial file is invalid: there is no good config yet;
        TokenError, TlsError, ValueError or StateFileError (before anything listens) for an
        unusable token, certificate, allowed host or state."""
        if self.settings.tls is not None:
            self.tls = ServerTls(self.settings.tls)
        token = resolve_token(self.settings.admin_token_file)
        read_token = resolve_read_token(self.settings.admin_read_token_file)
        admin_https = admin_tls(self.settings.admin_tls_cert, self.settings.admin_tls_key)
        hosts = allowed_hosts(self.settings.admin_host, self.settings.admin_allowed_hosts)
        if self.replication is not None:
            await self.replication.start()  # the overlay and the weight table, from Redis
            restored = dict(self.replication.weights.table)
        else:
            await self.overlay.load()
            restored = dict(self.overlay.weights)
        # The last weights (the state file's, or the replicas' table) go out with the first
        # config, so a restart does not snap every pool back to static weights.
        self.publisher.weights = {pool: saved.weights for pool, saved in restored.items()}
        await self._start_body_router()
        try:
            if self.kubernetes is not None:
                await self.kubernetes.start()
            await self.source.load(strict=True)
        except BaseException:
            await self.stop(0)
            raise
        if self.kubernetes is not None and not await self.kubernetes.settle(
            self.kubernetes.options.sync_timeout
        ):
            log.warning(
                "kubernetes: not every watch has listed after %.0f s; serving what is known "
                "and following the cluster as it answers",
                self.kubernetes.options.sync_timeout,
            )
        for pool, saved in restored.items():
            if self.engine.restore(pool, saved.weights, time.time() - saved.published_at):
                log.info("serving pool %s with its weights from before the restart", pool)
            else:  # expired (or no longer load-weighted): never served past its expiry
                self.publisher.forget_weights(pool)
        limits = self.settings.limits
        services = DiscoveryServices(
            self.cache,
            self.registry,
            self.admission.gate,
            limits.max_xds_request_bytes,
            limits.max_names_per_subscription,
        )
        self._grpc, self.xds_port = await start_grpc_server(
            [*services.handlers(), *self.lrs.handlers()],
            self.settings.host,
            self.settings.xds_port,
            self.tls,
            limits.grpc_options(),
        )
        self._engine_task = asyncio.create_task(self.engine.run())
        if self.replication is not None:
            self.replication.engine = self.engine
            self.replication.run()
        self._saver = asyncio.create_task(self._save_weights())
        self._admin_api = AdminApi(
            self.cache,
            self.registry,
            self.fleet,
            self.metrics,
            token,
            self.settings.admin_debounce,
            read_token=read_token,
            allowed_hosts=hosts,
            ready=lambda: self.ready,
            replicas=self.replication.status if self.replication is not None else None,
            kubernetes=self.kubernetes.health if self.kubernetes is not None else None,
        )
        self._admin, self.admin_port = await start_admin(
            await self._admin_api.app(),
            self.settings.admin_host,
            self.settings.admin_port,
            admin_https.context if admin_https else None,
        )
        self._watcher = asyncio.create_task(self.source.watch(self.settings.watch_interval))
        log.info(
            "serving xDS on %s:%d, admin on %s://%s:%d, snapshot %s",
            self.settings.host,
            self.xds_port,
            "https" if admin_https else "http",
            self.settings.admin_host,
            self.admin_port,
            self.settings.snapshot,
        )

    async def _start_body_router(self) -> None:
        """First, so that configs naming no router address point Envoy at this one's port."""
        host = self.settings.host
        self._router, self.router_port = await start_grpc_server(
            self.body_router.handlers(), host, self.settings.router_port, self.tls
        )
        reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.publisher.body_router = (reachable, self.router_port)
        log.info("body router (ext_proc) on %s:%d", host, self.router_port)

    def observe_load(
        self, loads: LoadProvider, reports_received: Callable[[], float] | None = None
    ) -> None:
        """Show load signals (pool -> endpoint key -> EndpointLoad) in the admin API, the
        status page and /metrics; `reports_received` counts LRS reports for /metrics."""
        self.fleet.loads = loads
        self.metrics.load.reports_received = reports_received

    @property
    def ready(self) -> bool:
        """What /readyz says: the first config is published and no shutdown has begun."""
        return self.publisher.config is not None and not self.shutting_down

    async def shutdown(self, drain_period: float | None = None) -> None:
        """Leave gracefully: unready at once, no new streams, the open ones closed one by
        one at random moments over the drain period (UNAVAILABLE: their Envoys reconnect,
        to other replicas), then stop."""
        period = self.settings.drain_period if drain_period is None else drain_period
        self.shutting_down = True
        self.admission.closed = True
        if self.replication is not None:
            await self.replication.step_down()  # another replica computes weights now
        message = "this control plane is shutting down; reconnect to another replica"
        enders: list[Callable[[], None]] = [
            partial(stream.end, message)
            for stream in self.cache.subscribers
            if isinstance(stream, Stream)
        ]
        enders += [partial(self.lrs.end_stream, i, message) for i in self.lrs.stream_ids()]
        log.info("shutting down: closing %d streams over %.1f s", len(enders), period)
        started = asyncio.get_running_loop().time()
        for at, end in sorted(
            ((random.uniform(0, period), end) for end in enders), key=lambda pair: pair[0]
        ):
            delay = started + at - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
            end()
        await self.stop()

    async def stop(self, grace: float = 1.0) -> None:
        for task in (self._watcher, self._engine_task, self._saver):
            if task is not None:
                task.cancel()
        if self._saver is not None:
            await self._flush_weights()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._admin_api is not None:
            self._admin_api.close()
        if self._admin is not None:
            await self._admin.cleanup()
        self.metrics.close()
        if self._router is not None:
            await self._router.stop(grace)
        await self.body_router.aclose()
        if self.replication is not None:
            await self.replication.stop()
        if self.kubernetes is not None:
            await self.kubernetes.stop()

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
