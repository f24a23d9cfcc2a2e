"""The local Dask cluster `mlnb batch-predict` starts speaks mutual TLS with a throw-away certificate: the model bytes
scattered to its workers cannot be read, nor tasks submitted, by another local process that finds the port."""
import pytest

from mlnb.core.cluster import local_cluster as _local_cluster


def test_the_local_cluster_speaks_tls_and_refuses_plain_and_foreign_clients():
    from distributed import Client
    from distributed.security import Security
    with _local_cluster(1) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:"), address
        assert all(w.startswith("tls://") for w in cluster.scheduler_info["workers"]), cluster.scheduler_info["workers"]
        with Client(cluster) as client:                                           # its own client: the cluster's credentials
            assert client.submit(lambda x: x + 1, 1).result(timeout=60) == 2
        with pytest.raises(Exception):
            Client(address.replace("tls://", "tcp://"), timeout=5)                 # plain TCP: the handshake fails
        with pytest.raises(Exception):
            Client(address, security=Security.temporary(), timeout=5)             # TLS, but a certificate of another CA
