"""The worker's reading of a request as it arrives (app/http_worker.py): when a request is
whole, when the app can refuse it from what is there, and when it must wait. The worker
itself is tested against a real gunicorn in test_hostile_clients.py."""

from __future__ import annotations

import json

import pytest

from app.http_worker import MAX_HEAD_BYTES, Pending, error_response

LIMIT = 1000


def fed(*parts: bytes) -> tuple[list[str], Pending]:
    """The states after each part arrives."""
    pending, states = Pending(b"", deadline=0), []
    for part in parts:
        pending.data += part
        states.append(pending.state(LIMIT))
    return states, pending


def test_a_head_in_pieces_waits_for_its_end():
    states, pending = fed(b"GET / HTT", b"P/1.1\r\nHost: x\r", b"\n", b"\r\n")
    assert states == ["more", "more", "more", "ready"] and pending.whole


def test_a_body_waits_for_its_content_length():
    states, pending = fed(b"POST /api HTTP/1.1\r\nContent-Length: 10\r\n\r\n", b"12345",
                          b"67890")
    assert states == ["more", "more", "ready"] and pending.whole


def test_a_body_over_the_limit_is_ready_at_once_to_be_refused():
    states, pending = fed(b"POST /api HTTP/1.1\r\nContent-Length: 1001\r\n\r\n")
    assert states == ["ready"] and not pending.whole


def test_a_chunked_body_waits_for_its_last_chunk_and_trailers():
    states, pending = fed(b"POST /api HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                          b"5\r\nhel", b"lo\r\n3;ext=1\r\nabc\r\n", b"0\r\n",
                          b"Trailer: y\r\n", b"\r\n")
    assert states == ["more"] * 5 + ["ready"] and pending.whole
    states, _ = fed(b"POST /api HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert states == ["ready"]


def test_a_chunked_body_is_ready_once_its_content_passes_the_limit():
    head = b"POST /api HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    states, pending = fed(head, b"fa0\r\n" + b"x" * 1000, b"x")  # a 4000-byte chunk, arriving
    assert states == ["more", "more", "ready"] and not pending.whole


@pytest.mark.parametrize("head", [
    b"POST /api HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n",
    b"POST /api HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST /api HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST /api HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_framing_goes_to_gunicorns_parser_at_once(head):
    assert fed(head)[0] == ["ready"]  # which answers 400 (or 501) without reading more


def test_a_head_over_the_limit_is_refused():
    states, _ = fed(b"GET / HTTP/1.1\r\n", b"X: " + b"y" * MAX_HEAD_BYTES)
    assert states == ["more", "head too large"]


def test_empty_lines_before_the_request_do_not_end_its_head():
    states, _ = fed(b"\r\n\r\nGET / HTTP/1.1\r\nX-Slow: ", b"1\r\n\r\n")
    assert states == ["more", "ready"]


def test_expect_continue_is_seen_on_http_11_only():
    _, pending = fed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert pending.expects_continue
    _, pending = fed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert not pending.expects_continue


def test_error_responses_are_json_that_close_the_connection():
    head, _, body = error_response(408, "Request Timeout", 'took "too" long').partition(
        b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout" and "Connection: close" in lines
    assert f"Content-Length: {len(body)}" in lines and json.loads(body) == {
        "error": 'took "too" long'}
    assert any(line.startswith("Content-Security-Policy: ") for line in lines)
