#!/usr/bin/env python3
"""A stand-in for the app Tollgate fronts, for tests/e2e/app_proxy_test.cpp.

Listens on 127.0.0.1 (a free port, printed as the first stdout line) and
answers, with HTTP/1.1 keep-alive:
  /download?size=N[&framing=chunked|length|close]  N deterministic bytes; the
      X-Body-Sha256 header holds their SHA-256
  /slow?delay=S       waits S seconds, then answers like /echo
  anything else       JSON describing the request it received: method, path,
      query, headers (a list of [name, value]), body_length, body_sha256, and
      peer_port (tells whether the gateway reused its connection)
Responses also carry hop-by-hop headers, which the gateway must not pass on.
"""
import hashlib
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

BLOCK = hashlib.sha256(b"tollgate").digest() * 2048  # 64 KiB


def pattern(size):
    return (BLOCK * (size // len(BLOCK) + 1))[:size]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", "0") or 0)
        return self.rfile.read(length) if length else b""

    def hop_by_hop(self):
        self.send_header("Connection", "X-App-Hop")
        self.send_header("X-App-Hop", "must not reach the client")
        self.send_header("Keep-Alive", "timeout=30")
        self.send_header("Proxy-Authenticate", "Basic")
        self.send_header("X-App-End-To-End", "kept")

    def do_any(self):
        body = self.read_body()
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/download":
            return self.download(int(query["size"][0]), query.get("framing", ["chunked"])[0])
        if url.path == "/slow":
            time.sleep(float(query.get("delay", ["1"])[0]))
        reply = json.dumps({
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "peer_port": self.client_address[1],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.hop_by_hop()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply)

    def download(self, size, framing):
        data = pattern(size)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("X-Body-Sha256", hashlib.sha256(data).hexdigest())
        self.hop_by_hop()
        if framing == "length":
            self.send_header("Content-Length", str(size))
        elif framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        step = 256 * 1024
        for i in range(0, size, step):
            piece = data[i:i + step]
            if framing == "chunked":
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
        if framing == "chunked":
            self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_any


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
