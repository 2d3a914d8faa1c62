"""The multi-port TCP app's AppConfig (`multi`), shared by the unit tests of config and port
policy and the integration test that dials a declared port on loopback."""

from __future__ import annotations

from apptunnel.config import AppConfig


def multi(uri="tcp://127.0.0.1", ports=((5432, 5432), (8000, 8010))) -> AppConfig:
    return AppConfig(name="multi", uri=uri, labels={}, public_addr=None, tcp_ports=ports)
