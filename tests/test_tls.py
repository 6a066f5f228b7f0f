"""TLS: a job whose scheduler and servers serve TLS, and workers that verify them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import trustme

import multiverso_py as mv
from multiverso_py import testing
from multiverso_py.errors import InvalidArgument
from multiverso_py.tls import load_tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a certificate for 127.0.0.1 that it signed, and another CA that signed nothing."""
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {"cert": folder / "cert.pem", "key": folder / "key.pem", "ca": folder / "ca.pem",
             "stranger": folder / "stranger.pem"}
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    ca.cert_pem.write_to_path(paths["ca"])
    stranger.cert_pem.write_to_path(paths["stranger"])
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture
def tls_cluster(pki: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[testing.LocalCluster]:
    for variable, name in (("MV_TLS_CERT", "cert"), ("MV_TLS_KEY", "key"), ("MV_TLS_CA", "ca")):
        monkeypatch.setenv(variable, pki[name])
    with testing.LocalCluster(workers=1, servers=2) as cluster:
        yield cluster


def test_a_job_over_tls(tls_cluster: testing.LocalCluster) -> None:
    with mv.init(tls_cluster.address, timeout=20) as job:
        # no plain local socket beside TLS: it would bypass it (nor any call on the caller's thread)
        assert all("local" not in conn.greeting for conn in job.client._conns.values())
        big = mv.ArrayTable(3 << 20, name="big")  # 12 MiB: many TLS records, both ways
        values = np.arange(3 << 20, dtype=np.float32)
        big.add(values)
        np.testing.assert_array_equal(big.get(), values)
        kv = mv.KVTable(dim=2, name="kv")
        kv.add([5, -7], np.ones((2, 2)))
        np.testing.assert_array_equal(kv.get([-7, 5]), np.ones((2, 2)))
        assert job.client.direct_calls == 0


def test_a_worker_that_does_not_trust_the_certificate_is_refused(tls_cluster: testing.LocalCluster, pki: dict,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MV_TLS_CA", pki["stranger"])
    with pytest.raises(mv.ConnectFailed, match="TLS .* failed"):
        mv.init(tls_cluster.address, timeout=10)
    monkeypatch.delenv("MV_TLS_CA")  # plain TCP to a TLS port: no handshake ever comes
    with pytest.raises(mv.ConnectFailed):
        mv.init(tls_cluster.address, timeout=3)
    monkeypatch.setenv("MV_TLS_CA", pki["ca"])
    with mv.init(tls_cluster.address, timeout=20):  # the job was not disturbed
        table = mv.ArrayTable(3, name="after")
        table.add(np.ones(3))
        np.testing.assert_array_equal(table.get(), np.ones(3))


def test_tls_settings_are_checked(pki: dict[str, str]) -> None:
    assert load_tls(environ={}).accept is None and load_tls(environ={}).connect is None
    with pytest.raises(InvalidArgument, match="both a certificate and its key"):
        load_tls(cert=pki["cert"], environ={})
    with pytest.raises(InvalidArgument, match="cannot set up TLS"):
        load_tls(cert=pki["key"], key=pki["cert"], environ={})
    with pytest.raises(InvalidArgument, match="cannot set up TLS"):
        load_tls(ca=str(Path(pki["ca"]).with_name("missing.pem")), environ={})
