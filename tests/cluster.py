"""A throwaway Redis Cluster for tests: 3 masters + 3 replicas of ``redis-server`` on loopback.

Each node runs from the installed binary on a free port in its own temp dir with
``cluster-enabled yes`` and a short ``cluster-node-timeout`` (quick failover); the cluster is
formed by ``redis-cli --cluster create ... --cluster-replicas 1`` and is ready when every node
reports ``cluster_state:ok``. Nodes are stopped by pid; the shared Redis on 6379 is never
touched.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
from servers import RedisServer, free_port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536 and _bindable(port + 10000):
            return port


class RedisClusterServers:
    """``masters`` masters, each with ``replicas`` replicas, on free loopback ports."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        tls: dict[str, Path] | None = None,
    ) -> None:
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        # With TLS (``ca.crt``, ``server.crt``, ``server.key``): clients, the cluster bus and
        # replication all speak TLS only.
        self.tls = tls
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL vel takes in ``REDIS_URL`` (every node as a seed);
        ``rediss+cluster://...?ssl_ca_certs=...`` with TLS."""
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        if self.tls is None:
            return "redis+cluster://" + seeds
        return f"rediss+cluster://{seeds}?ssl_ca_certs={self.tls['ca.crt']}"

    def node_client(self, node: RedisServer) -> redis.Redis:
        if self.tls is not None:
            return redis.Redis(
                host="127.0.0.1",
                port=node.port,
                socket_timeout=5,
                ssl=True,
                ssl_ca_certs=str(self.tls["ca.crt"]),
            )
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)

    def _tls_config(self, port: int) -> list[str]:
        if self.tls is None:
            return []
        return [
            "--port", "0", "--tls-port", str(port), "--tls-cluster", "yes",
            "--tls-replication", "yes", "--tls-cert-file", str(self.tls["server.crt"]),
            "--tls-key-file", str(self.tls["server.key"]),
            "--tls-ca-cert-file", str(self.tls["ca.crt"]), "--tls-auth-clients", "no",
        ]  # fmt: skip

    def info(self, node: RedisServer) -> dict[str, str]:
        client = self.node_client(node)
        try:
            raw = client.execute_command("CLUSTER", "INFO")
        finally:
            client.close()
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line and line.strip()
        )

    def role(self, node: RedisServer) -> str:
        client = self.node_client(node)
        try:
            return str(client.info("replication")["role"])
        finally:
            client.close()

    def start(self) -> RedisClusterServers:
        ports = [free_cluster_port() for _ in range(self.masters * (1 + self.replicas))]
        for port in ports:
            node = RedisServer(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--appendonly",
                "no",
                # Replicas sync at once (the default waits 5 s for more replicas to join),
                # and one may always fail over: these nodes hold test data only.
                "--repl-diskless-sync-delay",
                "0",
                "--cluster-replica-validity-factor",
                "0",
                *self._tls_config(port),
                port=port,
            )
            self.nodes.append(node)
            node.start()
        tls = [] if self.tls is None else ["--tls", "--cacert", str(self.tls["ca.crt"])]
        subprocess.run(
            [
                "redis-cli",
                *tls,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_ok()
        return self

    def live_nodes(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_ok(self, timeout: float = 30.0) -> float:
        """Wait until every live node says ``cluster_state:ok`` and sees every slot served by
        a live master; returns the seconds waited."""
        began = time.monotonic()
        deadline = began + timeout
        last: object = None
        while True:
            try:
                infos = [self.info(n) for n in self.live_nodes()]
                if (
                    all(
                        i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384"
                        for i in infos
                    )
                    and self.masters_up() == self.masters
                    and self.replicas_synced()
                ):
                    return time.monotonic() - began
                last = infos
            except redis.RedisError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise TimeoutError(f"cluster not ok after {timeout} s: {last}")
            time.sleep(0.1)

    def replicas_synced(self) -> bool:
        """Every live replica whose master is alive has its replication link up."""
        for node in self.live_nodes():
            client = self.node_client(node)
            try:
                info = client.info("replication")
            finally:
                client.close()
            if info["role"] != "slave":
                continue
            master_alive = any(int(info["master_port"]) == n.port for n in self.live_nodes())
            if master_alive and info.get("master_link_status") != "up":
                return False
        return True

    def masters_up(self) -> int:
        return sum(1 for n in self.live_nodes() if self.role(n) == "master")

    def master_of_key(self, key: str) -> RedisServer:
        """The live node serving ``key``'s slot as a master."""
        probe = self.node_client(self.live_nodes()[0])
        try:
            slot = int(probe.execute_command("CLUSTER", "KEYSLOT", key))
            for shard in probe.execute_command("CLUSTER", "SLOTS"):
                lo, hi, primary = int(shard[0]), int(shard[1]), shard[2]
                if lo <= slot <= hi:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        finally:
            probe.close()
        raise LookupError(f"no master serves {key!r}")

    def kill(self, node: RedisServer) -> None:
        """SIGKILL one node (by its own pid)."""
        node.kill(signal.SIGKILL)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill(signal.SIGKILL)
            shutil.rmtree(node.dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
