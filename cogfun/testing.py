"""Real servers on 127.0.0.1 for tests and benchmarks of remote shard dirs (never for training).

- `HTTPShardServer`: serves a folder over HTTP (`http.server`, threaded), counts the GETs of every
  path, and has a fault mode: `drop(path, n)` makes the next n GETs of `path` (n = -1: all of them)
  send the headers and half of the body, then close the connection, as a flaky network does;
  `delay` (seconds) holds every GET before it answers (slow links, concurrent fills).
- `S3Server`: moto's S3-compatible server (the `moto[server]` package); `environment()` holds the
  variables that point s3fs/botocore at it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        rel = self.path.split("?")[0].lstrip("/")
        time.sleep(self.server.delay)
        with self.server.lock:
            self.server.gets[rel] += 1
            left = self.server.drops.get(rel, 0)
            if left > 0:
                self.server.drops[rel] = left - 1
        if not left:
            return super().do_GET()
        f = self.send_head()        # status + headers with the full Content-Length
        if f is None:
            return
        with f:
            data = f.read()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.gets: Counter = Counter()
        self.drops: dict[str, int] = {}
        self.delay = 0.0


class HTTPShardServer:
    """`with HTTPShardServer(folder) as server:` ... `server.url` is http://127.0.0.1:<port>."""

    def __init__(self, root: str | Path):
        self.httpd = _Server(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HTTPShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def gets(self) -> Counter:
        """GET requests per path (relative to the served folder)."""
        with self.httpd.lock:
            return Counter(self.httpd.gets)

    @property
    def delay(self) -> float:
        return self.httpd.delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self.httpd.delay = seconds

    def drop(self, rel: str, times: int) -> None:
        """The next `times` GETs of `rel` break off halfway through the body (-1: every GET)."""
        with self.httpd.lock:
            self.httpd.drops[rel] = times


class S3Server:
    """moto's S3 server on 127.0.0.1 in a thread; `upload(folder, "bucket/prefix")` copies a folder."""

    KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def __enter__(self) -> "S3Server":
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    def environment(self) -> dict[str, str]:
        """What a process needs in its environment to reach this server through s3fs."""
        return {**self.KEYS, "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def upload(self, folder: str | Path, target: str) -> str:
        """Copy `folder` to s3://`target` (bucket created if needed); returns the URL."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=self.KEYS["AWS_DEFAULT_REGION"],
                              aws_access_key_id=self.KEYS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=self.KEYS["AWS_SECRET_ACCESS_KEY"])
        bucket, _, prefix = target.partition("/")
        if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}".lstrip("/"))
        return f"s3://{target}"
