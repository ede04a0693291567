"""Collectives bind to the node's own address, and unreachable peers fail in one line (real Ray actors)."""
import pytest

from specs.errors import UsageError
from workers.network import UnreachablePeers, collective_env, interface_for, unreachable_message


def test_collectives_bind_to_the_interface_holding_the_node_address():
    assert interface_for("127.0.0.1") == "lo"
    assert collective_env("127.0.0.1") == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert collective_env("127.0.0.1", "eth7")["GLOO_SOCKET_IFNAME"] == "eth7"  # cluster.yaml's choice wins
    with pytest.raises(UsageError, match="workers.network_interface"):
        collective_env("203.0.113.77")  # an address no interface here holds


def test_unreachable_message_names_ranks_nodes_and_addresses():
    infos = [{"rank": 0, "node": "a" * 40, "ip": "10.0.0.1"}, {"rank": 1, "node": "b" * 40, "ip": "10.0.0.2"}]
    line = unreachable_message(infos, {0: [{"rank": 1, "ip": "10.0.0.2", "port": 4242, "error": "Connection refused"}]})
    assert "\n" not in line
    assert "rank 0 on node aaaaaaaa (10.0.0.1) cannot reach rank 1 on node bbbbbbbb (10.0.0.2) at 10.0.0.2:4242" in line
    assert issubclass(UnreachablePeers, UsageError)  # the controller fails it at once, the CLI exits 2


@pytest.mark.ray
def test_a_peer_that_cannot_be_reached_fails_the_gang_before_the_rendezvous(ray_cluster, tmp_path):
    from data.storage import Storage
    from workers.worker_group import WorkerGroup, WorkerResources

    group = WorkerGroup(WorkerResources(2, 1, 0, 1), str(tmp_path / "run"), Storage(str(tmp_path)), name="probe")
    try:
        assert group.reserve(60)
        group.start()
        group.check_reachable()  # every rank reaches the others on this machine
        group.infos[1] = dict(group.infos[1], ip="203.0.113.77")  # as if rank 1's node address were unroutable
        with pytest.raises(UnreachablePeers) as err:
            group.check_reachable()
        assert "rank 0 on node" in str(err.value) and "203.0.113.77" in str(err.value)
        assert not group.distributed
    finally:
        group.shutdown()
