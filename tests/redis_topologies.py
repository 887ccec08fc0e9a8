"""Real Redis Sentinel and Redis Cluster setups on free local ports, started from ``redis-server``
(and ``redis-cli`` beside it) for the production-Redis tests; they fail, never skip, without them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import RedisServer, _free_port


def _exe(name: str) -> str:
    server = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if name == "redis-server" and server:
        return server
    found = shutil.which(name) or (str(Path(server).with_name(name)) if server else None)
    if not found or not Path(found).exists():
        pytest.fail(f"the production-Redis tests need {name} (apt-get install redis-server)", pytrace=False)
    return found


def _ask(port: int, *command: str) -> str:
    done = subprocess.run([_exe("redis-cli"), "-p", str(port), *command], capture_output=True, text=True, timeout=30)
    return done.stdout


def _wait(what: str, check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:g} s", pytrace=False)
        time.sleep(0.05)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = _free_port()
        if port + 10000 < 65536 and _bindable(port + 10000):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Cluster:
    """``size`` primaries (no replicas) with every slot assigned; ``url`` is ``redis+cluster://``."""

    def __init__(self, size: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="achihuo-cluster-")
        self.nodes: list[RedisServer] = []
        for i in range(size):
            node_dir = Path(self.dir) / str(i)
            node_dir.mkdir()
            conf = str(node_dir / "nodes.conf")
            node = RedisServer(node_dir, args=("--cluster-enabled", "yes", "--cluster-config-file", conf,
                                               "--cluster-node-timeout", "2000"))  # fmt: skip
            node.port = _cluster_port()
            node.url = f"redis://127.0.0.1:{node.port}/0"
            self.nodes.append(node)

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> Cluster:
        try:
            return self._start()
        except BaseException:
            self.remove()
            raise

    def _start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{p}" for p in self.ports]
        done = subprocess.run([_exe("redis-cli"), "--cluster", "create", *addresses, "--cluster-yes"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {done.stdout[-1000:]}{done.stderr[-1000:]}", pytrace=False)
        _wait("the Cluster did not settle", lambda: all("cluster_state:ok" in _ask(p, "cluster", "info")
                                                        for p in self.ports))  # fmt: skip
        return self

    def node_id(self, port: int) -> str:
        return _ask(port, "cluster", "myid").strip()

    def owner(self, slot: int) -> int:
        """The port of the primary serving ``slot``."""
        for line in _ask(self.ports[0], "cluster", "nodes").splitlines():
            fields = line.split()
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split(":")[1].split("@")[0])
        raise AssertionError(f"no node serves slot {slot}")

    def migrate_slot(self, slot: int, to_port: int, pause: float = 0.0) -> int:
        """Move ``slot`` to the node on ``to_port`` the way ``redis-cli --cluster reshard`` does, a
        few keys at a time (``pause`` seconds between batches); returns how many keys moved."""
        import redis

        src = self.owner(slot)
        src_id, dst_id = self.node_id(src), self.node_id(to_port)
        clients = {p: redis.Redis(port=p) for p in self.ports}
        try:
            clients[to_port].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            clients[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while True:
                keys = clients[src].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 5)  # binary keys: bytes
                if not keys:
                    break
                clients[src].execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause)
            for port in (to_port, src, *[p for p in self.ports if p not in (to_port, src)]):
                clients[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        finally:
            for client in clients.values():
                client.close()
        return moved

    def remove(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Sentinels:
    """A primary, a replica and three sentinels watching them as ``mymaster``; ``url`` is
    ``redis+sentinel://``. ``kill_primary()`` SIGKILLs the primary; the sentinels promote the replica."""

    SERVICE = "mymaster"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="achihuo-sentinel-"))
        self.primary = RedisServer(self.dir / "p", args=("--repl-diskless-sync", "yes"))
        self.replica = RedisServer(self.dir / "r", args=("--repl-diskless-load", "on-empty-db"))
        for d in ("p", "r"):
            (self.dir / d).mkdir()
        self.sentinel_ports = [_free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + f"/{self.SERVICE}/0"

    def start(self) -> Sentinels:
        try:
            return self._start()
        except BaseException:
            self.remove()
            raise

    def _start(self) -> Sentinels:
        self.primary.start()
        self.replica.args = (*self.replica.args, "--replicaof", "127.0.0.1", str(self.primary.port))
        self.replica.start()
        _wait("the replica did not sync", lambda: "master_link_status:up" in _ask(self.replica.port, "info",
                                                                                    "replication"))  # fmt: skip
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                f"sentinel failover-timeout {self.SERVICE} 4000\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n"
            )
            self.procs.append(subprocess.Popen([_exe("redis-server"), str(conf), "--sentinel"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        for port in self.sentinel_ports:
            _wait("a sentinel did not start", lambda port=port: _reachable(port))
            _wait("a sentinel did not see the replica",
                  lambda port=port: "slaves=1" in _ask(port, "info", "sentinel") or
                  "replicas=1" in _ask(port, "info", "sentinel"))  # fmt: skip
        _wait("the sentinels did not find each other",
              lambda: all("sentinels=3" in _ask(p, "info", "sentinel") for p in self.sentinel_ports))  # fmt: skip
        return self

    def primary_port(self) -> int:
        reply = _ask(self.sentinel_ports[0], "sentinel", "get-master-addr-by-name", self.SERVICE).split()
        return int(reply[1])

    def kill_primary(self) -> None:
        assert self.primary.proc is not None
        self.primary.proc.kill()
        self.primary.proc.wait(10)
        _wait("the sentinels did not promote the replica", lambda: self.primary_port() == self.replica.port,
              timeout=30)  # fmt: skip

    def remove(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.primary.stop()
        self.replica.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
