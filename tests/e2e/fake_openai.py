#!/usr/bin/env python3
"""A fake OpenAI-compatible upstream for Tollgate's end-to-end tests.

Listens on 127.0.0.1 (a free port, printed as the first stdout line), plain
HTTP or TLS (--cert/--key). The upstream model name picks the behaviour:

  normal   answers "Hello from fake upstream"; usage 13 + 5, 3 of them cached, 2 reasoning (only
           when asked, as OpenAI does)
  groq     the same, usage 17 + 6 in x_groq.usage only
  nousage  the same, never any usage
  slow     streams 300 pieces, one per 100 ms
  hang     never answers
  die      streams two pieces, then drops the connection
  flood    streams 100000 pieces of 1 KiB as fast as the socket takes them
           (GET /_stats "flood_sent" counts the pieces written so far)
  429      Retry-After: 7;  500, 400, 404: errors with a message
  tools    calls get_weather({"city": "Paris"}) as OpenAI does (streamed: the
           name first, then the arguments in pieces); finish_reason tool_calls

Upstreams that quote the request's headers (the provider key among them) in
their errors, as a careless or hostile provider might:

  leak-NNN      status NNN, an OpenAI-style JSON error
  leakraw-NNN   status NNN, a text/plain body, the key near byte 200
  leak-200      status 200, a JSON error instead of an answer
  leak-badjson  status 200, a body that is not JSON
  leak-stream   streams two pieces, then an error event

Upstreams that never stop (GET /_stats "big_sent" counts the bytes written,
up to 200 MB; they stop when the client goes away):

  longline        streams one piece, then one data line that never ends
  longline-first  the same without the piece
  longchunk       streams one piece, then a chunk header that never ends
  huge            a non-streamed answer that never ends

Asked for logprobs, the answers carry them in OpenAI's format (chat or legacy).
POST .../embeddings answers one 3-float embedding per input, usage 7 tokens per input.

GET /_last returns the last completion request (path, headers, body);
GET /_stats returns {"requests", "disconnects"} (clients that went away mid-answer).
"""
import argparse
import json
import select
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY = ["Hello", " from", " fake", " upstream"]
lock = threading.Lock()
state = {"last": None, "requests": 0, "disconnects": 0, "flood_sent": 0, "big_sent": 0}
BIG_LIMIT = 200 * 1024 * 1024


def logprobs_for(req, chat, pieces, first=0):
    """The logprobs OpenAI would send for `pieces` (piece i: -0.1 * (i + 1), one
    alternative "x" a nat lower), or None when the request did not ask."""
    if chat and not req.get("logprobs"):
        return None
    if not chat and req.get("logprobs") is None:
        return None
    n = req.get("top_logprobs", 0) if chat else req["logprobs"]
    entries = []
    for i, piece in enumerate(pieces, first):
        lp = -0.1 * (i + 1)
        top = [(piece, lp), ("x", lp - 1)][:n]
        entries.append((piece, lp, top))
    if chat:
        tok = lambda t, v: {"token": t, "logprob": v, "bytes": list(t.encode())}
        return {"content": [dict(tok(p, v), top_logprobs=[tok(t, w) for t, w in top]) for p, v, top in entries],
                "refusal": None}
    return {"tokens": [p for p, _, _ in entries], "token_logprobs": [v for _, v, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": [0] * len(entries)}


def count_disconnect():
    with lock:
        state["disconnects"] += 1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, obj, extra=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with lock:
            if self.path == "/_last":
                return self.send_json(200, state["last"] or {})
            if self.path == "/_stats":
                return self.send_json(200, {"requests": state["requests"], "disconnects": state["disconnects"],
                                            "flood_sent": state["flood_sent"], "big_sent": state["big_sent"]})
        self.send_json(404, {"error": {"message": "no such route"}})

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def event(self, obj):
        self.chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def tool_call(self, req, usage):
        arguments = ['{"city"', ': "Paris"}']
        call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
        if not req.get("stream"):
            call["function"]["arguments"] = "".join(arguments)
            message = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
            return self.send_json(200, {"id": "x", "object": "chat.completion", "model": "tools", "usage": usage,
                                        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deltas = [{"role": "assistant", "content": None, "tool_calls": [dict(call, index=0)]}]
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": a}}]} for a in arguments]
        for delta in deltas:
            self.event({"id": "x", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        self.event({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        if (req.get("stream_options") or {}).get("include_usage"):
            self.event({"id": "x", "choices": [], "usage": usage})
        self.chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def quoted_headers(self):
        return "the request headers were " + json.dumps({k.lower(): v for k, v in self.headers.items()})

    def leak(self, model, req):
        kind, _, status = model.partition("-")
        if kind == "leakraw":
            # The key lands across the 200th byte, where a naive cut would halve it.
            auth = self.headers.get("Authorization", "")
            data = ("x" * (190 - len("Bearer ")) + auth + " " + self.quoted_headers()).encode()
            self.send_response(int(status))
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        # The key in code and param too: short identifiers the gateway relays (scrubbed).
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        error = {"error": {"message": "denied: " + self.quoted_headers(), "type": "x", "code": key, "param": key}}
        if status == "badjson":
            data = ("<html>oops " + self.quoted_headers()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        if status != "stream":
            return self.send_json(int(status), error)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in REPLY[:2]:
            self.event({"id": "x", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        self.event(error)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def never_ending(self, model):
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if model == "huge" else "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if model == "huge":
                self.chunk(b'{"id": "x", "choices": [{"index": 0, "message": {"content": "')
            elif model in ("longline", "longchunk"):
                self.event({"id": "x", "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]})
            if model in ("longline", "longline-first"):
                self.chunk(b"data: ")
            elif model == "longchunk":
                self.wfile.write(b"5;ext=")
            block = b"a" * 65536
            while state["big_sent"] < BIG_LIMIT:
                if model == "longchunk":
                    self.wfile.write(block)
                else:
                    self.chunk(block)
                with lock:
                    state["big_sent"] += len(block)
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            count_disconnect()
            self.close_connection = True

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        req = json.loads(body)
        with lock:
            state["requests"] += 1
            state["last"] = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": req}
        model = req.get("model", "")
        chat = self.path.endswith("/chat/completions")
        if model == "hang":
            # Answers nothing; notices when the client gives up.
            deadline = time.time() + 60
            while time.time() < deadline:
                r, _, _ = select.select([self.connection], [], [], 0.1)
                if r and not self.connection.recv(1, 0):
                    count_disconnect()
                    break
            self.close_connection = True
            return
        if model.startswith("leak"):
            return self.leak(model, req)
        if model in ("longline", "longline-first", "longchunk", "huge"):
            return self.never_ending(model)
        if model in ("429", "500", "400", "404"):
            messages = {"429": "Rate limit reached for model", "500": "internal failure upstream",
                        "400": "bad thing: temperature", "404": "The model does not exist"}
            extra = {"Retry-After": "7"} if model == "429" else None
            error = {"message": messages[model], "type": "x", "code": None}
            if model == "400":
                error.update({"param": "temperature", "code": "invalid_value"})
            return self.send_json(int(model), {"error": error}, extra)
        if self.path.endswith("/embeddings"):
            inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
            data = [{"object": "embedding", "index": i, "embedding": [0.5, -0.25, float(i)]}
                    for i in range(len(inputs))]
            return self.send_json(200, {"object": "list", "data": data, "model": model,
                                        "usage": {"prompt_tokens": 7 * len(inputs), "total_tokens": 7 * len(inputs)}})
        usage = {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18,
                 "prompt_tokens_details": {"cached_tokens": 3}, "completion_tokens_details": {"reasoning_tokens": 2}}
        if model == "tools":
            return self.tool_call(req, usage)
        groq_usage = {"prompt_tokens": 17, "completion_tokens": 6, "total_tokens": 23}
        if not req.get("stream") or model == "jsononly":  # jsononly: a server that ignores "stream"
            text = "".join(REPLY)
            choice = {"index": 0, "finish_reason": "stop", "logprobs": logprobs_for(req, chat, REPLY)}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            resp = {"id": "x", "object": "chat.completion" if chat else "text_completion", "model": model,
                    "choices": [choice]}
            if model in ("normal", "jsononly"):
                resp["usage"] = usage
            if model == "groq":
                resp["x_groq"] = {"id": "g", "usage": groq_usage}
            return self.send_json(200, resp)

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if model == "slow":
            pieces = ["t%d " % i for i in range(300)]
        elif model == "flood":
            pieces = ("f" * 1024 for _ in range(100000))
        else:
            pieces = REPLY
        try:
            self.chunk(b": keep-alive comment\n\n")
            for i, piece in enumerate(pieces):
                choice = {"index": 0, "finish_reason": None}
                if model != "flood":
                    choice["logprobs"] = logprobs_for(req, chat, [piece], i)
                if chat:
                    choice["delta"] = {"content": piece}
                else:
                    choice["text"] = piece
                data = b"data: " + json.dumps({"id": "x", "choices": [choice]}).encode() + b"\n\n"
                if i == 1:
                    # One event split across two chunks, as TCP may split it.
                    self.chunk(data[:7])
                    self.chunk(data[7:])
                else:
                    self.chunk(data)
                if model == "die" and i == 1:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if model == "slow":
                    time.sleep(0.1)
                if model == "flood":
                    with lock:
                        state["flood_sent"] += 1
            final = {"id": "x", "choices": [{"index": 0, "finish_reason": "stop",
                                             **({"delta": {}} if chat else {"text": ""})}]}
            if model == "groq":
                final["x_groq"] = {"id": "g", "usage": groq_usage}
            self.event(final)
            include = (req.get("stream_options") or {}).get("include_usage")
            if model == "normal" and include:
                self.event({"id": "x", "choices": [], "usage": usage})
            self.chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            count_disconnect()
            self.close_connection = True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    # The test closes our stdin when it is done, or dies: either way we exit.
    threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
