"""The worker's reading of a request as it arrives (app/http_worker.py): when a request is
whole, when the app can refuse it from what is there, when it must wait, and what the
main loop refuses itself. The framing is fuzzed against gunicorn's own parser, which
reads the same bytes later. The worker itself is tested against a real gunicorn in
test_hostile_clients.py."""

from __future__ import annotations

import base64
import json
import time

import pytest
from gunicorn.config import Config
from gunicorn.http.errors import NoMoreData
from gunicorn.http.parser import RequestParser
from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.http_worker import MAX_HEAD_BYTES, Pending, app_path, body_limit_for, error_response
from app.platform.settings import Settings

LIMIT = 1000
CHUNKED = b"POST /api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def limited(limit: int = LIMIT):
    """A ``body_limit`` that gives every request the same limit."""
    return lambda request: limit


def fed(*parts: bytes, body_limit=limited()) -> tuple[list[str], Pending]:
    """The states after each part arrives."""
    pending, states = Pending(b"", deadline=0, body_limit=body_limit), []
    for part in parts:
        pending.data += part
        states.append(pending.state())
    return states, pending


def test_a_head_in_pieces_waits_for_its_end():
    states, pending = fed(b"GET / HTT", b"P/1.1\r\nHost: x\r", b"\n", b"\r\n")
    assert states == ["more", "more", "more", "ready"] and pending.whole


def test_a_body_waits_for_its_content_length():
    states, pending = fed(b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n",
                          b"12345", b"67890")
    assert states == ["more", "more", "ready"] and pending.whole


def test_a_body_over_the_limit_is_ready_at_once_to_be_refused():
    states, pending = fed(b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
    assert states == ["ready"] and not pending.whole


def test_a_chunked_body_waits_for_its_last_chunk_and_trailers():
    states, pending = fed(CHUNKED, b"5\r\nhel", b"lo\r\n3;ext=1\r\nabc\r\n", b"0\r\n",
                          b"Trailer: y\r\n", b"\r\n")
    assert states == ["more"] * 5 + ["ready"] and pending.whole
    states, _ = fed(CHUNKED + b"0\r\n\r\n")
    assert states == ["ready"]


def test_a_chunked_body_is_ready_once_its_content_passes_the_limit():
    states, pending = fed(CHUNKED, b"fa0\r\n" + b"x" * 990, b"x" * 11)  # a 4000-byte chunk
    assert states == ["more", "more", "ready"] and not pending.whole


def test_chunked_framing_counts_toward_the_limit():
    """1-byte chunks, each with an extension: 900 bytes of content in 34 KB of framing are
    refused; a body at the limit in 8 KB chunks is not (its framing is a few bytes)."""
    states, pending = fed(CHUNKED, b"1;aaaaaaaaaa=bbbbbbbbbbbbbbbbbbbb\r\nx\r\n" * 900)
    assert states == ["more", "refused"] and pending.refusal[0] == 413
    assert "chunked framing" in pending.refusal[2]
    states, pending = fed(CHUNKED, b"1f4\r\n" + b"x" * 500 + b"\r\n", b"1f4\r\n" + b"x" * 500
                          + b"\r\n", b"0\r\n\r\n")
    assert states == ["more", "more", "more", "ready"] and pending.whole


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n", 400),
    (b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    (b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    (b"POST /api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (CHUNKED + b"zz\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 needs Host
    *[(CHUNKED + size + b"\r\n", 400) for size in
      (b"-6", b"-07", b"-8;a", b"-0x8", b"+5", b"0x5", b"5_0", b" 5", b"-0")],
])
def test_malformed_framing_is_refused_at_once(request_bytes, status):
    states, pending = fed(request_bytes)
    assert states == ["refused"] and pending.refusal[0] == status


def test_an_endless_chunk_size_line_or_trailer_is_refused_at_the_head_limit():
    """Bounded by the head's limit, however large the body limit."""
    for opening in (b"1;", b"0\r\nX-Trailer: "):
        pending = Pending(CHUNKED + opening, deadline=0, body_limit=limited(10**9))
        state, sent = pending.state(), len(CHUNKED + opening)
        while state == "more":
            pending.data += b"a" * 4096
            sent += 4096
            state = pending.state()
        assert state == "refused" and pending.refusal[0] == 400
        assert sent <= len(CHUNKED) + MAX_HEAD_BYTES + 2 * 4096


def test_a_head_over_the_limit_is_refused():
    states, pending = fed(b"GET / HTTP/1.1\r\n", b"X: " + b"y" * MAX_HEAD_BYTES)
    assert states == ["more", "refused"] and pending.refusal[0] == 431


def test_empty_lines_before_the_request_do_not_end_its_head():
    states, _ = fed(b"\r\n\r\nGET / HTTP/1.1\r\nX-Slow: ", b"1\r\nHost: x\r\n\r\n")
    assert states == ["more", "ready"]
    states, pending = fed(b"\r\n" * (MAX_HEAD_BYTES // 2), b"\r\n")  # but not for ever
    assert states == ["more", "refused"] and pending.refusal[0] == 431


def test_expect_continue_is_seen_on_http_11_only():
    _, pending = fed(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 3\r\n\r\n")
    assert pending.expects_continue
    _, pending = fed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert not pending.expects_continue


# ---- the training page's upload: a larger limit, decided from the head --------------------

TOKEN = "t" * 20
USUAL = 1024  # FABLE_MAX_BODY_BYTES (its least)
UPLOAD_LIMIT = 4 * USUAL
BEARER = f"Authorization: Bearer {TOKEN}\r\n".encode()
BASIC = b"Authorization: Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()) + b"\r\n"


def upload_limits(token: str | None = TOKEN):
    """The worker's ``body_limit`` with FABLE_MAX_BODY_BYTES at USUAL and the training
    page's uploads at UPLOAD_LIMIT."""
    return body_limit_for(Settings.load(environ={}, overrides={
        "FABLE_ADMIN_TOKEN": token or "", "FABLE_MAX_BODY_BYTES": USUAL,
        "FABLE_TRAIN_UPLOAD_BYTES": UPLOAD_LIMIT}))


def upload(target: bytes = b"/train", fields: bytes = BEARER, method: bytes = b"POST",
           length: int = 3 * USUAL) -> bytes:
    return (method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + fields
            + b"Content-Length: %d\r\n\r\n" % length)


@pytest.mark.parametrize("head", [
    upload(), upload(fields=BASIC), upload(b"/train?step=1"), upload(b"/tr%61in"),
    upload(b"//train"), upload(b"http://x/train"), upload(fields=BEARER.lower()),
], ids=["bearer", "basic", "query", "percent", "slashes", "absolute", "lower-case"])
def test_a_train_upload_with_the_token_waits_for_a_body_past_the_usual_limit(head):
    """Bearer or Basic (any user name), whatever spelling of the path the app reads as
    /train: the worker buffers the whole body, up to FABLE_TRAIN_UPLOAD_BYTES."""
    states, pending = fed(head, b"x" * 2 * USUAL, b"x" * USUAL, body_limit=upload_limits())
    assert states == ["more", "more", "ready"] and pending.whole
    assert pending.max_body == UPLOAD_LIMIT


@pytest.mark.parametrize("head", [
    upload(fields=b""),  # no token
    upload(fields=BEARER.replace(b"t\r\n", b"x\r\n")),  # a wrong one
    upload(fields=b"Authorization: Basic !!!\r\n"),  # a malformed Basic
    upload(fields=BEARER + BEARER),  # repeated: the app reads "Bearer t...,Bearer t..."
    upload(b"/train/x"), upload(b"/trains"), upload(b"/api/generate"), upload(b"/"),
    upload(method=b"PUT"), upload(method=b"GET"),
], ids=["no-token", "wrong-token", "bad-basic", "repeated", "/train/x", "/trains",
        "/api/generate", "/", "PUT", "GET"])
def test_any_other_request_keeps_the_usual_limit(head):
    """Refused from its Content-Length at once (the app answers 413), never buffered."""
    states, pending = fed(head, body_limit=upload_limits())
    assert states == ["ready"] and not pending.whole and pending.max_body == USUAL


def test_without_an_admin_token_every_train_upload_may_send_more():
    states, pending = fed(upload(fields=b""), b"x" * 3 * USUAL, body_limit=upload_limits(None))
    assert states == ["more", "ready"] and pending.whole
    states, _ = fed(upload(b"/api/generate", b""), body_limit=upload_limits(None))
    assert states == ["ready"]


def test_the_upload_limit_holds_for_its_body_and_no_more():
    states, pending = fed(upload(length=UPLOAD_LIMIT + 1), body_limit=upload_limits())
    assert states == ["ready"] and not pending.whole


def test_a_chunked_train_upload_counts_against_the_larger_limit_only_with_the_token():
    head = b"POST /train HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    chunk = b"1f4\r\n" + b"x" * 500 + b"\r\n"  # 3000 bytes in all
    states, pending = fed(head + BEARER + b"\r\n", chunk * 6, b"0\r\n\r\n",
                          body_limit=upload_limits())
    assert states == ["more", "more", "ready"] and pending.whole
    states, pending = fed(head + b"\r\n", chunk * 6, body_limit=upload_limits())
    assert states == ["more", "ready"] and not pending.whole  # for the app to refuse
    states, pending = fed(head + BEARER + b"\r\n", b"1;aaaaaaaaaa=bbbbbbbbbbbbbbbbbbbb\r\nx\r\n"
                          * 3000, body_limit=upload_limits())  # framing: the head's allowance
    assert states == ["more", "refused"] and f"over {UPLOAD_LIMIT} bytes" in pending.refusal[2]


@pytest.mark.parametrize("target, path", [
    (b"/train", "/train"), (b"/train?a=b", "/train"), (b"/tr%61in", "/train"),
    (b"//train", "/train"), (b"http://host:1/train?x", "/train"), (b"/train/", "/train/"),
    (b"/%2Ftrain", "/train"), (b"/caf%C3%A9", "/caf\u00e9"), (b"http://[x/train", ""),
])
def test_the_worker_reads_a_target_as_the_app_will(target, path):
    assert app_path(target) == path


def test_error_responses_are_json_that_close_the_connection():
    head, _, body = error_response(408, "Request Timeout", 'took "too" long').partition(
        b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout" and "Connection: close" in lines
    assert f"Content-Length: {len(body)}" in lines and json.loads(body) == {
        "error": 'took "too" long'}
    assert any(line.startswith("Content-Security-Policy: ") for line in lines)


# ---- fuzzing the framing ------------------------------------------------------------------

def gunicorn_reads(data: bytes) -> bytes | None:
    """The body gunicorn's parser reads from exactly ``data``; None when it refuses the
    request. It must never want more than the worker handed it (a thread would block)."""
    parser = RequestParser(Config(), iter([data]), ("127.0.0.1", 1))
    try:
        return next(parser).body.read()
    except NoMoreData:
        raise AssertionError(f"gunicorn wanted more than {data!r}") from None
    except Exception:  # noqa: BLE001 - any refusal of gunicorn's is a 400 to the client
        return None


HEX = st.integers(0, 40).map(lambda n: format(n, "x"))
SIZE_TOKEN = st.one_of(
    st.tuples(st.just(""), st.just(""), st.sampled_from(["", ";ext", ";a=b"])),  # well formed
    st.tuples(st.sampled_from(["-", "+", "0x", "0X", " ", "_", "\t", "-0x"]),
              st.sampled_from(["", "_", " ", "\t", "g"]),
              st.sampled_from(["", ";ext", ";a=b", " ", "\x00", "\r"])))


@st.composite
def chunked_requests(draw) -> tuple[bytes, bytes | None]:
    """A chunked request and its content; None where a size line is not ``1*HEXDIG``
    (a sign, a prefix, an underscore, spaces, a NUL, a lone CR)."""
    body, content, valid = b"", b"", True
    for _ in range(draw(st.integers(0, 4))):
        data = draw(st.binary(min_size=1, max_size=40))
        prefix, infix, suffix = draw(SIZE_TOKEN)
        digits = format(len(data), "x")
        if infix and len(digits) > 1:
            digits = digits[0] + infix + digits[1:]
        elif infix:
            digits += infix
        valid = valid and not prefix and not infix and suffix in ("", ";ext", ";a=b")
        body += (prefix + digits + suffix).encode("latin-1") + b"\r\n" + data + b"\r\n"
        content += data
    if draw(st.booleans()):
        body += b"0\r\nX-Trailer: " + draw(st.sampled_from([b"1", b"a" * 200])) + b"\r\n\r\n"
    else:
        body += b"0\r\n\r\n"
    if draw(st.booleans()):  # a huge size, and content past the limit
        body = b"ffffffffffffffffffff\r\n" + b"x" * (LIMIT + 1) + body
        valid = None  # ready for the app to refuse, never whole
    return CHUNKED + body, content if valid else valid  # content, False or None


@settings(max_examples=400, deadline=2000, derandomize=True)
@given(request=chunked_requests(), cuts=st.lists(st.integers(1, 400), max_size=6))
@example(request=(CHUNKED + b"-6\r\n", False), cuts=[])
@example(request=(CHUNKED + b"-0x8\r\n", False), cuts=[1, 2, 3])
def test_fuzzed_chunked_framing_reaches_the_app_whole_or_gets_a_4xx(request, cuts):
    """Sizes with signs, prefixes, underscores, spaces and huge values, sent in pieces:
    every call returns at once; a well-framed request is whole and gunicorn reads the same
    content from the same bytes; anything else is refused here (4xx) or by gunicorn."""
    data, content = request
    pending, state, start = Pending(b"", deadline=0, body_limit=limited()), "more", 0
    for cut in sorted({c for c in cuts if c < len(data)}) + [len(data)]:
        if state != "more":
            break
        pending.data += data[start:cut]
        start = cut
        began = time.perf_counter()
        state = pending.state()
        assert time.perf_counter() - began < 0.5
    if state == "refused":
        assert 400 <= pending.refusal[0] < 500 and not isinstance(content, bytes), pending.refusal
        return
    assert state == "ready"
    if content is None:  # a huge size: ready so that the app refuses it, not whole
        assert not pending.whole
        return
    assert pending.whole
    read = gunicorn_reads(bytes(pending.data))
    if isinstance(content, bytes):
        assert read == content
    else:
        assert read is None  # h11 let it by (e.g. spaces after the size); gunicorn refuses


@pytest.mark.parametrize("request_bytes", [
    CHUNKED + b"-6\r\n",
    CHUNKED + b"5;a\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"\r\nPOST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
])
def test_every_split_of_a_request_gives_the_same_answer(request_bytes):
    """Split at every byte: the state after the last piece is the same as all at once."""
    whole, _ = fed(request_bytes)
    for cut in range(1, len(request_bytes)):
        states, _ = fed(request_bytes[:cut], request_bytes[cut:])
        assert states[-1] == whole[-1], cut
        assert states[0] in ("more", whole[-1])
