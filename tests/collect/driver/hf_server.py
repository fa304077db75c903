"""An OpenAI-compatible completions server around a real (tiny, random-weight) HF MoE model generating on
CPU, for the driver tests. Stdlib HTTP, one process:

    python hf_server.py   -> prints "PORT <n>", serves on 127.0.0.1:<n> until its stdin closes

`model.generate` runs in a thread with a streamer that stamps every generated token (time.monotonic_ns)
and hands it to the HTTP handler, which writes one SSE event per token (usage in every chunk) and stamps
the send (before and after the write). The request's arrival is the kernel's receive time. GET /_timings?id=<X-Request-Id> returns those server-side stamps. Requests are served one at a
time (a lock around generate), as a batch-size-1 engine would.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from scripted_server import SO_TIMESTAMPNS, _kernel_arrival_ns
from tinyhf import build_tokenizer
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.generation.streamers import BaseStreamer

MODEL_NAME = "tiny-qwen2-moe-random"
# generate() is mostly Python for a model this small and holds the GIL; a short switch interval lets the
# HTTP thread write and stamp each token promptly instead of up to 5 ms later.
sys.setswitchinterval(0.0002)
torch.set_num_threads(1)
torch.manual_seed(0)
TOKENIZER = build_tokenizer()
MODEL = Qwen2MoeForCausalLM(
    Qwen2MoeConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        bos_token_id=TOKENIZER.bos_token_id,
        eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id,
    )
).eval()
GENERATE_LOCK = threading.Lock()
TIMINGS: dict[str, dict] = {}
TIMINGS_LOCK = threading.Lock()


class StampingStreamer(BaseStreamer):
    """Receives each new token from generate (the first put is the prompt) and queues (time, ids)."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.q.put((time.monotonic_ns(), value.reshape(-1).tolist()))

    def end(self):
        self.q.put(None)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def handle_one_request(self):
        # the kernel's receive time of the request: the server-side TTFT starts there
        self.arrived_ns = _kernel_arrival_ns(self.connection)
        super().handle_one_request()

    def log_message(self, *args):
        pass

    def _json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _event(self, obj):
        payload = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})
        if url.path == "/_timings":
            with TIMINGS_LOCK:
                return self._json(200, TIMINGS.get(parse_qs(url.query).get("id", [""])[0]))
        return self._json(404, {"detail": "Not Found"})

    def do_POST(self):
        arrived = getattr(self, "arrived_ns", None) or time.monotonic_ns()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if urlparse(self.path).path != "/v1/completions":
            return self._json(404, {"detail": "Not Found"})
        rid = self.headers.get("X-Request-Id", "")
        prompt = body.get("prompt", "")
        ids = prompt if isinstance(prompt, list) else TOKENIZER.encode(prompt, add_special_tokens=False)
        max_new = int(body.get("max_tokens", 16))
        if len(ids) + max_new > MODEL.config.max_position_embeddings:
            return self._json(
                400,
                {
                    "error": {
                        "message": f"prompt of {len(ids)} tokens + {max_new} exceeds the context of {MODEL.config.max_position_embeddings}"
                    }
                },
            )
        streamer = StampingStreamer()
        kwargs = {"max_new_tokens": max_new, "do_sample": False, "streamer": streamer}
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_new

        def run():
            with GENERATE_LOCK, torch.no_grad():
                MODEL.generate(
                    torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs
                )

        threading.Thread(target=run, daemon=True).start()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        stamps = []
        n = 0
        while True:
            item = streamer.q.get()
            if item is None:
                break
            t_gen, toks = item
            n += len(toks)
            before = time.monotonic_ns()
            self._event(
                {
                    "id": f"cmpl-{rid}",
                    "choices": [
                        {
                            "index": 0,
                            "text": TOKENIZER.decode(toks),
                            "finish_reason": "length" if n >= max_new else None,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": len(ids),
                        "completion_tokens": n,
                        "total_tokens": len(ids) + n,
                    },
                }
            )
            stamps.append(
                {
                    "generated_ns": t_gen,
                    "send_start_ns": before,
                    "sent_ns": time.monotonic_ns(),
                    "tokens": len(toks),
                }
            )
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        with TIMINGS_LOCK:
            TIMINGS[rid] = {"arrived_ns": arrived, "chunks": stamps, "prompt_tokens": len(ids)}
        return None


class Server(ThreadingHTTPServer):
    daemon_threads = True


def main() -> None:
    server = Server(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
