"""free_port: the ports Envoy's listeners and admin are given before they bind them."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from xds_lab.envoy_rig import (
    PlaneWithEnvoy,
    _ephemeral_low,
    free_port,
    local_settings,
    one_pool_snapshot,
)


def test_free_ports_are_distinct_bindable_and_not_what_binding_port_0_returns() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)  # never handed out twice, even once freed
    low = _ephemeral_low()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # free when handed out
    if low > 11_024:  # Linux's default range: below it, a bind to port 0 cannot take them
        assert all(low - 10_000 <= port < low for port in ports)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            assert sock.getsockname()[1] not in ports


@pytest.mark.envoy
async def test_a_first_config_envoy_rejects_fails_the_start(tmp_path: Path) -> None:
    """A listener port taken by someone else: Envoy NACKs the listener. Converging counts a
    NACK as an answer, so without this check traffic went to whatever held the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        pool = {"name": "llama", "endpoints": [{"address": "127.0.0.1", "port": 9}]}
        path = tmp_path / "snapshot.yaml"
        path.write_text(yaml.safe_dump(one_pool_snapshot(port, pool)))
        pair = PlaneWithEnvoy(local_settings(path), tmp_path, "envoy-rig")
        with pytest.raises(RuntimeError, match=r"rejected its first config: .*Listener"):
            await pair.start()
