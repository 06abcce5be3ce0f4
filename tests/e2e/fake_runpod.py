#!/usr/bin/env python3
"""A fake RunPod serverless endpoint for Tollgate's end-to-end tests.

Listens on 127.0.0.1 (a free port, printed as the first stdout line), plain
HTTP, under /v2/{endpoint}:

  POST /runsync   a job: IN_QUEUE at first; GET /status/{id} answers IN_PROGRESS
                  once, then COMPLETED with Tollgate's own output shape
                  {"text": "Hello from fake runpod", "finish_reason": "stop",
                  "usage": {"prompt_tokens": 12, "completion_tokens": 4}}
  POST /run       a streamed job: GET /stream/{id} answers one poll with no
                  pieces, then the pieces "Hello", " from", " fake", " runpod" in
                  worker-vllm's shape, two per poll, the last poll COMPLETED with
                  usage {"input": 12, "output": 4}
  POST /cancel/{id}  CANCELLED

Requests without "Authorization: Bearer <--key>" get a 401.
GET /_last returns the last job request (path, authorization, body); GET /_stats
{"requests": N, "polls": N, "cancels": N}.
"""
import argparse
import itertools
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PIECES = ["Hello", " from", " fake", " runpod"]
lock = threading.Lock()
state = {"last": None, "requests": 0, "polls": 0, "cancels": 0, "jobs": {}}
ids = itertools.count(1)
KEY = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorized(self):
        if self.headers.get("Authorization") == "Bearer " + KEY:
            return True
        self.send_json(401, {"error": "unauthorized"})
        return False

    def do_GET(self):
        with lock:
            if self.path == "/_last":
                return self.send_json(200, state["last"] or {})
            if self.path == "/_stats":
                return self.send_json(200, {k: state[k] for k in ("requests", "polls", "cancels")})
        if not self.authorized():
            return
        m = re.fullmatch(r"/v2/[A-Za-z0-9_-]+/(status|stream)/([A-Za-z0-9_-]+)", self.path)
        with lock:
            job = state["jobs"].get(m.group(2)) if m else None
            if job is None:
                return self.send_json(404, {"error": "no such job"})
            state["polls"] += 1
            job["polls"] += 1
            polls = job["polls"]
        if m.group(1) == "status":
            if polls == 1:
                return self.send_json(200, {"id": job["id"], "status": "IN_PROGRESS"})
            return self.send_json(200, {"id": job["id"], "status": "COMPLETED", "output": {
                "text": "".join(PIECES), "finish_reason": "stop",
                "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}}})
        # Poll 1: nothing yet; then two pieces per poll.
        start = max(0, (polls - 2) * 2)
        pieces = PIECES[start:start + 2] if polls > 1 else []
        done = polls > 1 and start + 2 >= len(PIECES)
        stream = [{"output": [{"choices": [{"tokens": [p]}], "usage": {"input": 12, "output": start + i + 1}}]}
                  for i, p in enumerate(pieces)]
        self.send_json(200, {"id": job["id"], "status": "COMPLETED" if done else "IN_PROGRESS", "stream": stream})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if not self.authorized():
            return
        m = re.fullmatch(r"/v2/[A-Za-z0-9_-]+/(runsync|run|cancel/[A-Za-z0-9_-]+)", self.path)
        if not m:
            return self.send_json(404, {"error": "no such route"})
        if m.group(1).startswith("cancel/"):
            with lock:
                state["cancels"] += 1
            return self.send_json(200, {"id": m.group(1)[7:], "status": "CANCELLED"})
        job = {"id": "job-%d" % next(ids), "polls": 0}
        with lock:
            state["requests"] += 1
            state["last"] = {"path": self.path, "authorization": self.headers.get("Authorization"),
                             "body": json.loads(body)}
            state["jobs"][job["id"]] = job
        self.send_json(200, {"id": job["id"], "status": "IN_QUEUE"})


def main():
    global KEY
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", required=True)
    KEY = parser.parse_args().key
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    # The test closes our stdin when it is done, or dies: either way we exit.
    threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
