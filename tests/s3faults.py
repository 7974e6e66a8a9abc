"""An HTTP proxy in front of the S3 test server that injects faults.

Each request is forwarded to the upstream server unless the fault plan says
otherwise for it: answer 503 SlowDown or 500 InternalError, drop the
connection without an answer, or stall (read the request, answer nothing).
``delay`` adds a round trip's latency to every request (bench/verify_bench.py).
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.plan = lambda method, n: None   # -> None | "503" | "500" | "drop" | "stall"
        self.path_plan = None                # (method, path) -> the same, if set
        self.delay = 0.0   # seconds added to every request, as a network's round trip
        self.requests = 0
        self.faults = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    fault = (proxy.path_plan(self.command, self.path) if proxy.path_plan
                             else proxy.plan(self.command, proxy.requests))
                    if fault:
                        proxy.faults += 1
                if proxy.delay:
                    time.sleep(proxy.delay)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "stall":
                    time.sleep(5)
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault in ("503", "500"):
                    payload = SLOWDOWN if fault == "503" else INTERNAL
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{proxy.upstream_port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer has no body but the length of the object.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
