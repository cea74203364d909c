#!/bin/sh
# Prints the Envoy bootstrap of examples/envoy-gateway: `make -C deploy bootstrap` writes it to
# examples/envoy-gateway/envoy.yaml, and tests/test_manifests.py checks that file against this
# script's output. Each Envoy pod passes --service-node $(POD_NAME), so node.id is the pod's
# name; node.cluster selects the node group; the address is the Service in deploy/base.
set -eu
XDS_SERVER=${XDS_SERVER:-xds-server}
exec "$XDS_SERVER" bootstrap \
    --node-id envoy-gateway \
    --cluster inference-gateway \
    --xds-address xds-server.xds-system.svc.cluster.local:18000
