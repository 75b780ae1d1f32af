"""Fixtures, and the shared helpers under the names test files import from here.

The helpers themselves live in :mod:`tests.helpers`; these names stay importable from
``tests.conftest`` for the files that import them from here.
"""

from __future__ import annotations

import pytest
import trustme
from hypothesis import HealthCheck, settings

from tests.helpers import (  # noqa: F401 (re-exported)
    ALL_STREAM,
    CLIENT_KEY,
    FAST_BACKOFF,
    FIREHOSE_KEY,
    POLYGON_KEY,
    Client,
    authed_client,
    connect,
    filtered_config,
    firehose_config,
    selects,
    simulator_config,
    start_simulator,
    start_tier,
    wait_until,
)

#: Hypothesis fails an example that takes over 200 ms, and data that is slow to generate, by
#: default: timed assertions of speed, which a busy machine breaks. The tests here say what must
#: hold, not how fast.
settings.register_profile("busy-machine", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("busy-machine")


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> dict[str, str]:
    """A test CA and a certificate for localhost and 127.0.0.1: paths of ca, cert and key."""
    folder = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    certificate = authority.issue_cert("localhost", "127.0.0.1")
    paths = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    authority.cert_pem.write_to_path(paths["ca"])
    certificate.cert_chain_pems[0].write_to_path(paths["cert"])
    certificate.private_key_pem.write_to_path(paths["key"])
    return {name: str(path) for name, path in paths.items()}
