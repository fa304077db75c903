"""Incremental Server-Sent Events decoding (the framing of OpenAI-compatible streams)."""

from __future__ import annotations


class SSEDecoder:
    """Feed raw bytes as they arrive; get back the `data` of every event they complete.

    Follows the SSE rules that matter here: events end at a blank line, `data:` lines of one event are
    joined with newlines, comment lines (`:`) and other fields are ignored, CRLF and LF both end lines.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []
        self._scanned = 0  # bytes of _buf already known to hold no newline

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events: list[str] = []
        start = 0
        while True:
            nl = self._buf.find(b"\n", max(start, self._scanned))
            if nl < 0:
                self._scanned = len(self._buf) - start
                break
            line = bytes(self._buf[start:nl])
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                self._data.append(value.decode("utf-8", "replace"))
        del self._buf[:start]
        return events

    def flush(self) -> list[str]:
        """Events left when the stream ends without a final blank line."""
        events = self.feed(b"\n\n") if self._buf else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)
