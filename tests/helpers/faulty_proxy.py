"""An HTTP proxy in front of the S3 test endpoint that fails a share of requests the way S3
does under load: 503 SlowDown (throttling), 500 InternalError, and dropped connections."""

from __future__ import annotations

import http.client
import http.server
import random
import threading
import urllib.parse
from collections import Counter

_ERRORS = {
    503: b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    500: b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>",
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultyProxy:
    """``with FaultyProxy(upstream, rate=0.1) as proxy: proxy.url``; ``proxy.counts`` says what
    happened (``ok``, ``503``, ``500``, ``reset``)."""

    def __init__(self, upstream: str, rate: float = 0.1, seed: int = 0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rate = rate
        self.random = random.Random(seed)
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and Expect: 100-continue, like S3

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._draw()
                if fault == "reset":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault:
                    payload = _ERRORS[fault]
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if self.command != "HEAD" or "content-length" not in {
                    k.lower() for k, _ in resp.getheaders()
                }:
                    self.send_header("Content-Length", str(len(data)))
                else:
                    self.send_header("Content-Length", resp.getheader("Content-Length"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _draw(self):
        with self.lock:
            roll = self.random.random()
            if roll >= self.rate:
                self.counts["ok"] += 1
                return None
            fault = self.random.choice([503, 503, 500, "reset"])
            self.counts[str(fault)] += 1
            return fault

    def __enter__(self) -> FaultyProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
