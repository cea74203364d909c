"""Trimmed LoadStatsRequest classes: only the fields the load store reads get Python objects.

Measured hot path (bench/lrs_ingest.py): a report of 2,000 endpoint stats costs far more to
*read* through protobuf's Python objects than to parse, and most of that is wrapper objects
for submessages. These classes are wire-compatible views of envoy.service.load_stats.v3
LoadStatsRequest declared in a private descriptor pool:

- the node (field 1) is not declared at all: upb skips its ~61 kB in C;
- UpstreamEndpointStats.address is declared `bytes`: the serialized Address submessage is one
  bytes object, a ready dict key (resolved once to an endpoint and cached by the store)
  instead of two submessage wrappers and two string reads per endpoint stat;
- fields the store never reads (metadata, connection counts, drops, priority) are left out,
  so upb keeps them as unknown bytes without building anything.

Everything else keeps its real Envoy type (Locality, Duration, EndpointLoadMetricStats,
UnnamedEndpointLoadMetricStats), so values read the same as from the full messages.
"""

from __future__ import annotations

from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import load_report_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.protobuf.message import Message

__all__ = ["UNNAMED_METRICS", "TrimmedReport", "unnamed_metrics"]

#: Locality-level ORCA fields of UpstreamLocalityStats, read as metrics of these names.
UNNAMED_METRICS: Final = ("cpu_utilization", "mem_utilization", "application_utilization")
_FILE: Final = "xds_server_lrs_wire.proto"
_PACKAGE: Final = "xds_server.lrs.wire"
_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_U64, _STRING, _BYTES, _MESSAGE = _F.TYPE_UINT64, _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE

_COUNTS: Final = (
    ("total_successful_requests", 2),
    ("total_requests_in_progress", 3),
    ("total_error_requests", 4),
)
_METRIC: Final = f".{load_report_pb2.EndpointLoadMetricStats.DESCRIPTOR.full_name}"
_UNNAMED: Final = f".{load_report_pb2.UnnamedEndpointLoadMetricStats.DESCRIPTOR.full_name}"

#: message name -> fields (name, number, type, label, message type or "").
_MESSAGES: Final = {
    "EndpointStats": (
        ("address", 1, _BYTES, _OPTIONAL, ""),
        *((name, number, _U64, _OPTIONAL, "") for name, number in _COUNTS),
        ("load_metric_stats", 5, _MESSAGE, _REPEATED, _METRIC),
        ("total_issued_requests", 7, _U64, _OPTIONAL, ""),
    ),
    "LocalityStats": (
        ("locality", 1, _MESSAGE, _OPTIONAL, f".{base_pb2.Locality.DESCRIPTOR.full_name}"),
        *((name, number, _U64, _OPTIONAL, "") for name, number in _COUNTS),
        ("load_metric_stats", 5, _MESSAGE, _REPEATED, _METRIC),
        ("upstream_endpoint_stats", 7, _MESSAGE, _REPEATED, f".{_PACKAGE}.EndpointStats"),
        ("total_issued_requests", 8, _U64, _OPTIONAL, ""),
        ("cpu_utilization", 12, _MESSAGE, _OPTIONAL, _UNNAMED),
        ("mem_utilization", 13, _MESSAGE, _OPTIONAL, _UNNAMED),
        ("application_utilization", 14, _MESSAGE, _OPTIONAL, _UNNAMED),
    ),
    "ClusterStats": (
        ("cluster_name", 1, _STRING, _OPTIONAL, ""),
        ("upstream_locality_stats", 2, _MESSAGE, _REPEATED, f".{_PACKAGE}.LocalityStats"),
        (
            "load_report_interval",
            4,
            _MESSAGE,
            _OPTIONAL,
            f".{duration_pb2.Duration.DESCRIPTOR.full_name}",
        ),
    ),
    "Report": (("cluster_stats", 2, _MESSAGE, _REPEATED, f".{_PACKAGE}.ClusterStats"),),
}


def _pool() -> descriptor_pool.DescriptorPool:
    """The default pool (where the real Envoy types live), with the trimmed file added once."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_FILE)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto(
            name=_FILE,
            package=_PACKAGE,
            syntax="proto3",
            dependency=[
                load_report_pb2.DESCRIPTOR.name,
                base_pb2.DESCRIPTOR.name,
                duration_pb2.DESCRIPTOR.name,
            ],
        )
        for message_name, fields in _MESSAGES.items():
            message = proto.message_type.add(name=message_name)
            for name, number, kind, label, type_name in fields:
                field = message.field.add(name=name, number=number, type=kind, label=label)
                if type_name:
                    field.type_name = type_name
        pool.Add(proto)
    return pool


def _message_class(name: str) -> type[Message]:
    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"{_PACKAGE}.{name}"))


#: A LoadStatsRequest as the store reads it: cluster_stats only, endpoint addresses as bytes.
TrimmedReport: Final = _message_class("Report")


def unnamed_metrics(stats: Any) -> list[Any]:
    """The locality's dedicated cpu/mem/application utilization fields, as named metric sums.

    Envoy 1.40 leaves them empty (it reports these under their names in load_metric_stats),
    but other reporters (proxyless gRPC) may set them.
    """
    found = []
    for name in UNNAMED_METRICS:
        if stats.HasField(name):
            field = getattr(stats, name)
            found.append(
                load_report_pb2.EndpointLoadMetricStats(
                    metric_name=name,
                    num_requests_finished_with_metric=field.num_requests_finished_with_metric,
                    total_metric_value=field.total_metric_value,
                )
            )
    return found
