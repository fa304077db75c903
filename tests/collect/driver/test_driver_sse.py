"""The SSE decoder: events come out whole however the bytes are split across reads."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from moecap.collect.driver import SSEDecoder

payloads = st.lists(
    st.one_of(
        st.dictionaries(st.sampled_from(["text", "id", "n"]), st.text(max_size=20) | st.integers()),
        st.just("[DONE]"),
    ),
    min_size=1,
    max_size=8,
)


def _encode(events, crlf: bool, comments: bool) -> bytes:
    nl = "\r\n" if crlf else "\n"
    out = []
    for ev in events:
        if comments:
            out.append(f": keep-alive{nl}")
        data = ev if isinstance(ev, str) else json.dumps(ev, ensure_ascii=False)
        out.append(f"event: message{nl}data: {data}{nl}{nl}")
    return "".join(out).encode()


@settings(max_examples=150, deadline=None)
@given(payloads, st.booleans(), st.booleans(), st.lists(st.integers(min_value=1, max_value=7), max_size=40))
def test_any_split_gives_the_same_events(events, crlf, comments, cuts):
    raw = _encode(events, crlf, comments)
    dec = SSEDecoder()
    got = []
    pos = 0
    for c in cuts:
        got += dec.feed(raw[pos : pos + c])
        pos += c
    got += dec.feed(raw[pos:])
    got += dec.flush()
    expected = [e if isinstance(e, str) else json.dumps(e, ensure_ascii=False) for e in events]
    assert got == expected


def test_multiline_data_unterminated_tail_and_utf8_split():
    dec = SSEDecoder()
    assert dec.feed(b"data: a\ndata: b\n\n") == ["a\nb"]
    euro = "data: \u20ac\n\n".encode()
    assert dec.feed(euro[:7]) == [] and dec.feed(euro[7:]) == ["\u20ac"]  # a character split across reads
    assert dec.feed(b"data: tail") == []
    assert dec.flush() == ["tail"]
    assert dec.flush() == []


def test_a_long_line_is_scanned_once():
    """A 16 MiB line fed in 4 KiB reads: linear time (each read scans only its new bytes)."""
    import time

    dec = SSEDecoder()
    piece = b"x" * 4096
    t0 = time.monotonic()
    assert dec.feed(b"data: ") == []
    for _ in range(4096):
        assert dec.feed(piece) == []
    assert dec.feed(b"\n\n") == ["x" * (4096 * 4096)]
    assert time.monotonic() - t0 < 1.5
