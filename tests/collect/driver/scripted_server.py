"""A scripted OpenAI-compatible server for the driver tests (stdlib only), run as its own process.

    python scripted_server.py [--dump-key records|batches] [--models-body TEXT] [--as-sglang] [--as-vllm]
        [--server-info JSON] [--max-prompt-ids N]
        -> prints "PORT <n>", serves on 127.0.0.1:<n> until its stdin closes (TEXT: the /v1/models body)

Each request's behaviour comes from its prompt (or last chat message): a scenario name then key=value
options in any order, e.g. "stream ttft_ms=300 itl_ms=20 tokens=12 groups=1,3,2". Token k (0-based) is "generated"
at ttft_ms + k*itl_ms after the request arrived; a chunk is sent when its last token is generated, so
a chunk of g tokens follows the previous one by g*itl_ms. Sleeps are absolute-deadline `time.sleep`s in
this process (sub-millisecond on Linux), and every chunk frame is one write on a TCP_NODELAY socket.

Scenarios: stream, http500, ctx400, drop (closes the socket after 3 chunks), badjson (one malformed
event), nonstream (one JSON body after ttft_ms, whatever `stream` says; `body=<percent-encoded text>`
replaces it), flaky (503 for the first
`fail=K` attempts of a request id, then stream), hang (never answers). `answer=N` makes the last two
tokens "#### N" (a GSM8K-style answer). `inject=<percent-encoded text>` sends one extra event with that
data after chunk `at=K` (default 1) of a stream; `bloat_mib=N` sends, after chunk 1, an event of N MiB that
never ends.

Also: GET /v1/models (with --as-sglang also SGLang's /get_model_info and /get_server_info; with --as-vllm
vLLM's /version), GET /server_info (the --server-info body, else 404: SGLang's info endpoint and vLLM's
dev-mode one), token-id prompts (one, or a batch: a list of lists) streamed or not as `stream` says, and
answered as ctx400 when one is longer than --max-prompt-ids,
GET /_timings?id=<X-Request-Id> (server-side monotonic send times of each chunk), GET /_seen (ids, rid body fields and bodies received), GET /_control (batch-recording calls and their `model`), and the MoE-CAP / ServerlessLLM batch
recording endpoints (start / stop / dump / clear / status), whose records describe finished requests.
Scenario `barrier n=N group=G wait_s=S` holds each request until N requests of group G are open at once
(or S seconds passed), then streams as `stream` from that moment; GET /_released says, per request id,
how many were open at its release and whether it timed out.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

STATE = {
    "timings": {},
    "seen": [],
    "attempts": {},
    "recording": False,
    "records": [],
    "control": [],
    "pass_id": 0,
    "barriers": {},
    "released": {},
}
LOCK = threading.Lock()
BARRIER = threading.Condition()
DUMP_KEY = "records"
RECORDING_ENDPOINTS = True
MODELS_BODY: str | None = None
AS_SGLANG = False
AS_VLLM = False
SERVER_INFO: str | None = None
MAX_PROMPT_IDS: int | None = None
WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]


SO_TIMESTAMPNS = 35  # Linux; socket does not export it


def _kernel_arrival_ns(sock: socket.socket) -> int | None:
    """Monotonic time at which the next queued bytes reached `sock` (SO_TIMESTAMPNS), without consuming
    them; None when the kernel does not say."""
    try:
        data, anc, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(16), socket.MSG_PEEK)
    except OSError:
        return None
    if not data:
        return None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= 16:
            sec, nsec = struct.unpack("qq", payload[:16])
            return sec * 1_000_000_000 + nsec - (time.time_ns() - time.monotonic_ns())
    return None


def _word(k: int, n: int, answer: str | None) -> str:
    """Token k of n: filler words, ending in "#### <answer>" when the scenario names an answer."""
    if answer is not None and k == n - 2:
        return "####"
    if answer is not None and k == n - 1:
        return answer
    return WORDS[k % len(WORDS)]


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


def parse_scenario(text: str) -> tuple[str, dict[str, str]]:
    parts = text.split()  # in any order: drive's warm-ups reorder a prompt's words
    name = next((p for p in parts if "=" not in p), "stream")
    opts = dict(p.split("=", 1) for p in parts if "=" in p)
    return name, opts


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def handle_one_request(self):
        # Anchor the injected schedule on the kernel's receive time of the request's first bytes, not
        # on when this thread got a CPU to parse it: on a loaded host the two differ by milliseconds.
        self.arrived_ns = _kernel_arrival_ns(self.connection)
        super().handle_one_request()

    def log_message(self, *args):  # quiet
        pass

    # -- helpers ---------------------------------------------------------------------------------
    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, payload: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))

    def _event(self, obj) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self._chunk(f"data: {data}\n\n".encode())

    def _timings(self, arrived: float, sent: list) -> dict:
        """What GET /_timings returns for a request: its arrival, its chunks, the client port it came from."""
        return {"arrived_ns": int(arrived * 1e9), "chunks": sent, "peer_port": self.client_address[1]}

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else {}

    # -- routes ----------------------------------------------------------------------------------
    def do_GET(self):
        url = urlparse(self.path)
        q = parse_qs(url.query)
        if url.path == "/v1/models":
            if MODELS_BODY is not None:
                data = MODELS_BODY.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None
            return self._json(200, {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})
        if url.path == "/_timings":
            with LOCK:
                return self._json(200, STATE["timings"].get(q.get("id", [""])[0]))
        if url.path == "/_control":
            with LOCK:
                return self._json(200, STATE["control"])
        if url.path == "/_released":
            with BARRIER:
                return self._json(200, STATE["released"])
        if url.path == "/_seen":
            with LOCK:
                return self._json(200, STATE["seen"])
        if url.path == "/get_model_info" and AS_SGLANG:  # SGLang 0.5's info endpoints, as drive probes them
            return self._json(200, {"model_path": "scripted-model", "is_generation": True})
        if url.path == "/server_info" and SERVER_INFO is not None:
            return self._json(200, json.loads(SERVER_INFO))
        if url.path == "/version" and AS_VLLM:
            return self._json(200, {"version": "0.26.0"})
        if url.path == "/get_server_info" and AS_SGLANG:
            return self._json(200, {"version": "0.5.16"})
        if url.path == "/batch_recording_status" and RECORDING_ENDPOINTS:
            with LOCK:
                STATE["control"].append(("status", q.get("model", [None])[0]))
                return self._json(
                    200, {"is_recording": STATE["recording"], "total_records": len(STATE["records"])}
                )
        return self._json(404, {"detail": "Not Found"})

    def do_POST(self):
        arrived = (getattr(self, "arrived_ns", None) or time.monotonic_ns()) / 1e9
        url = urlparse(self.path)
        body = self._body()
        if url.path.endswith("_batch_recording") and RECORDING_ENDPOINTS:
            return self._control(url.path.strip("/").split("_")[0], body)
        if url.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._json(404, {"detail": "Not Found"})
        chat = url.path.endswith("chat/completions")
        text = body["messages"][-1]["content"] if chat else body.get("prompt", "")
        if isinstance(text, list):  # token ids (one prompt, or a batch of them): max_tokens, as asked
            prompts = text if text and isinstance(text[0], list) else [text]
            too_long = MAX_PROMPT_IDS is not None and max(map(len, prompts)) > MAX_PROMPT_IDS
            kind = "stream" if body.get("stream", True) else "nonstream"
            text = "ctx400" if too_long else f"{kind} tokens={body.get('max_tokens', 4)}"
        name, opts = parse_scenario(text)
        rid = self.headers.get("X-Request-Id", "")
        with LOCK:
            STATE["seen"].append(
                {"id": rid, "rid": body.get("rid"), "body": body, "target": self.path,
                 "authorization": self.headers.get("Authorization")}
            )  # fmt: skip
            attempt = STATE["attempts"][rid] = STATE["attempts"].get(rid, 0) + 1
        if name == "http500":
            return self._json(
                500, {"object": "error", "message": "internal failure in the scripted engine", "code": 500}
            )
        if name == "ctx400":
            return self._json(
                400,
                {
                    "error": {
                        "message": "This model's maximum context length is 64 tokens. However, you requested 900 tokens.",
                        "type": "BadRequestError",
                        "code": 400,
                    }
                },
            )
        if name == "flaky" and attempt <= int(opts.get("fail", 1)):
            return self._json(503, {"error": {"message": "overloaded, retry later"}})
        if name == "hang":
            time.sleep(float(opts.get("s", 30)))
            return None
        if name == "barrier":
            arrived = self._barrier(
                rid, opts.get("group", ""), int(opts.get("n", 2)), float(opts.get("wait_s", 20))
            )
        ttft = float(opts.get("ttft_ms", 5)) / 1e3
        itl = float(opts.get("itl_ms", 2)) / 1e3
        n_tok = int(opts.get("tokens", body.get("max_tokens", 4)))
        groups = [int(g) for g in opts.get("groups", "1").split(",")]
        if name == "nonstream":
            time.sleep(max(0.0, arrived + ttft + itl * (n_tok - 1) - time.monotonic()))
            text_out = " ".join(_word(i, n_tok, opts.get("answer")) for i in range(n_tok))
            self._record_passes(rid, n_tok)
            if "body" in opts:
                data = unquote(opts["body"]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None
            with LOCK:
                STATE["timings"][rid] = self._timings(
                    arrived, [{"t_ns": time.monotonic_ns(), "tokens": n_tok}]
                )
            return self._json(
                200,
                {
                    "id": f"cmpl-{rid}",
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": text_out, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": n_tok, "total_tokens": 7 + n_tok},
                },
            )
        return self._stream(body, chat, rid, name, opts, arrived, ttft, itl, n_tok, groups)

    def _stream(self, body, chat, rid, name, opts, arrived, ttft, itl, n_tok, groups):
        so = body.get("stream_options") or {}
        continuous = bool(so.get("continuous_usage_stats"))
        include_usage = bool(so.get("include_usage"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if chat:
            self._event({"id": f"chatcmpl-{rid}", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        sent = []
        done = 0
        gi = 0
        while done < n_tok:
            g = min(groups[gi % len(groups)], n_tok - done)
            gi += 1
            last = done + g - 1
            _sleep_until(arrived + ttft + itl * last)
            piece = "".join(" " + _word(done + k, n_tok, opts.get("answer")) for k in range(g))
            done += g
            choice = {"index": 0, "finish_reason": "length" if done == n_tok else None}
            if chat:
                choice["delta"] = {"content": piece}
            else:
                choice["text"] = piece
            ev = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "choices": [choice]}
            if continuous:
                ev["usage"] = {"prompt_tokens": 7, "completion_tokens": done, "total_tokens": 7 + done}
            if name == "badjson" and len(sent) == 1:
                self._chunk(b"data: {this is not json\n\n")
            if "bloat_mib" in opts and len(sent) == 1:  # one event that never ends
                with contextlib.suppress(OSError):  # the client hangs up part-way
                    self._chunk(b"data: ")
                    for _ in range(int(opts["bloat_mib"]) * 16):
                        self._chunk(b"x" * 65536)
                return None
            if "inject" in opts and len(sent) == int(opts.get("at", 1)):
                self._chunk(f"data: {unquote(opts['inject'])}\n\n".encode())
            self._event(ev)
            sent.append({"t_ns": time.monotonic_ns(), "tokens": g})
            if name == "drop" and len(sent) == 3:
                with LOCK:
                    STATE["timings"][rid] = self._timings(arrived, sent)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return None
        if include_usage:
            self._event(
                {
                    "id": f"cmpl-{rid}",
                    "choices": [],
                    "usage": {"prompt_tokens": 7, "completion_tokens": n_tok, "total_tokens": 7 + n_tok},
                }
            )
        self._event("[DONE]")
        self._chunk(b"")
        with LOCK:
            STATE["timings"][rid] = self._timings(arrived, sent)
        self._record_passes(rid, n_tok)
        return None

    def _barrier(self, rid: str, group: str, n: int, wait_s: float) -> float:
        """Hold the request until `n` requests of `group` are open here (or `wait_s` passed); the
        schedule then starts at the release. Records how many were open and whether it timed out."""
        with BARRIER:
            waiting = STATE["barriers"].setdefault(group, [])
            waiting.append(rid)
            BARRIER.notify_all()
            full = BARRIER.wait_for(lambda: len(waiting) >= n, timeout=wait_s)
            STATE["released"][rid] = {
                "open": len(waiting),
                "timed_out": not full,
                "t_ns": time.monotonic_ns(),
            }
        return time.monotonic()

    def _record_passes(self, rid: str, n_tok: int) -> None:
        """MoE-CAP-shaped records for one finished request: a prefill pass, then one decode pass per token."""
        with LOCK:
            if not STATE["recording"]:
                return
            STATE["pass_id"] += 1
            STATE["records"].append(
                {
                    "forward_pass_id": STATE["pass_id"],
                    "batch_size": 1,
                    "latency": 0.004,
                    "seq_lens_sum": 7,
                    "forward_mode": "prefill",
                    "expert_activation": 5.5,
                    "gpu_num": 2,
                    "gpu_raw_type": "NVIDIA-H100-HBM3-80GB",
                    "scheduled_tokens": 7,
                    "per_req_info": [
                        {
                            "req_id": rid,
                            "extend_len": 7,
                            "total_len": 7,
                            "prompt_len": 7,
                            "is_last_chunk": True,
                        }
                    ],
                }
            )
            for _ in range(1, n_tok):
                STATE["pass_id"] += 1
                STATE["records"].append(
                    {
                        "forward_pass_id": STATE["pass_id"],
                        "batch_size": 1,
                        "latency": 0.002,
                        "seq_lens_sum": 1,
                        "forward_mode": "decode",
                        "req_ids": [rid],
                        "expert_activation": 3.25,
                        "gpu_num": 2,
                        "gpu_raw_type": "NVIDIA-H100-HBM3-80GB",
                        "scheduled_tokens": 1,
                    }
                )

    def _control(self, verb: str, body: dict) -> None:
        with LOCK:
            STATE["control"].append((verb, body.get("model")))
            if verb == "start":
                STATE["recording"] = True
                STATE["records"] = []
                return self._json(200, {"status": "success", "message": "Started recording batch statistics"})
            if verb == "stop":
                STATE["recording"] = False
                return self._json(200, {"status": "success", "total_records": len(STATE["records"])})
            if verb == "dump":
                return self._json(
                    200,
                    {"status": "success", DUMP_KEY: STATE["records"], "total_records": len(STATE["records"])},
                )
            if verb == "clear":
                n = len(STATE["records"])
                STATE["records"] = []
                return self._json(200, {"status": "success", "message": f"Cleared {n} records"})
        return self._json(404, {"detail": "Not Found"})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # a burst of connections, as uvicorn's backlog takes (socketserver's is 5)


def main() -> None:
    global DUMP_KEY, RECORDING_ENDPOINTS, MODELS_BODY, AS_SGLANG, AS_VLLM, SERVER_INFO, MAX_PROMPT_IDS
    if "--server-info" in sys.argv:
        SERVER_INFO = sys.argv[sys.argv.index("--server-info") + 1]
    if "--max-prompt-ids" in sys.argv:
        MAX_PROMPT_IDS = int(sys.argv[sys.argv.index("--max-prompt-ids") + 1])
    AS_VLLM = "--as-vllm" in sys.argv
    if "--dump-key" in sys.argv:
        DUMP_KEY = sys.argv[sys.argv.index("--dump-key") + 1]
    if "--models-body" in sys.argv:
        MODELS_BODY = sys.argv[sys.argv.index("--models-body") + 1]
    RECORDING_ENDPOINTS = "--no-recording" not in sys.argv
    AS_SGLANG = "--as-sglang" in sys.argv
    server = Server(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()  # the parent closes our stdin (or dies): stop
    server.shutdown()


if __name__ == "__main__":
    main()
