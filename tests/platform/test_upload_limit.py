"""The training page's upload (``POST /train``) may send FABLE_TRAIN_UPLOAD_BYTES, and only
from a client allowed to train: the admin check on a bare header (shared by the app and
the worker), the app's per-request limit, and a real gunicorn whose worker buffers the
larger body only for such a request. The worker's reading of a head is tested in
test_http_worker.py."""

from __future__ import annotations

import base64
import io
import socket

import pytest

from app.platform.web import admin_credentials_match, is_train_upload
from tests.gunicorn_server import GunicornServer, read_answer

TOKEN = "admin-token-0123456789"
BODY = 100 * 1024  # over FABLE_MAX_BODY_BYTES (64 KiB), under FABLE_TRAIN_UPLOAD_BYTES


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---- the admin check on a header ----------------------------------------------------------

@pytest.mark.parametrize("header, basic_ok, expected", [
    (f"Bearer {TOKEN}", False, True),
    (f"bearer   {TOKEN} ", False, True),  # the scheme in any case; spaces around the token
    (basic("admin", TOKEN), True, True),
    (basic("", TOKEN), True, True),  # any user name, even none
    (basic("x:y", TOKEN), True, False),  # the password is what follows the first colon
    (basic("admin", TOKEN), False, False),  # Basic only where the caller takes it
    (f"Bearer {TOKEN}x", False, False),
    (f"Bearer {TOKEN[:-1]}", False, False),
    (basic("admin", "wrong"), True, False),
    ("Basic !!!not-base64", True, False),
    ("Basic " + base64.b64encode(b"admin:\xff").decode(), True, False),  # not UTF-8
    ("Basic", True, False),
    (TOKEN, True, False),  # no scheme
    (f"Token {TOKEN}", True, False),
    ("", True, False),
    (None, True, False),
])
def test_admin_credentials_match(header, basic_ok, expected):
    assert admin_credentials_match(header, TOKEN, basic=basic_ok) is expected


def test_without_a_token_every_request_is_an_admins():
    for header in (None, "", "Bearer anything", "Basic !!!"):
        assert admin_credentials_match(header, None, basic=False)


def test_only_a_post_to_train_itself_is_an_upload():
    bearer = f"Bearer {TOKEN}"
    assert is_train_upload("POST", "/train", bearer, TOKEN)
    assert is_train_upload("POST", "/train", basic("me", TOKEN), TOKEN)
    assert is_train_upload("POST", "/train", None, None)
    for method, path, header in [("POST", "/train", None), ("POST", "/train", "Bearer x"),
                                 ("GET", "/train", bearer), ("PUT", "/train", bearer),
                                 ("POST", "/train/", bearer), ("POST", "/train/x", bearer),
                                 ("POST", "/api/generate", bearer)]:
        assert not is_train_upload(method, path, header, TOKEN), (method, path, header)


# ---- the app ------------------------------------------------------------------------------

def multipart(size: int = BODY) -> tuple[bytes, str]:
    """An upload form whose minutes are not a number: the page refuses it (400) without
    starting a run, once it has read the whole body."""
    boundary = "fable-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nupload\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"minutes\"\r\n\r\nx\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"upload\"; "
            f"filename=\"story.txt\"\r\nContent-Type: text/plain\r\n\r\n").encode()
    end = f"\r\n--{boundary}--\r\n".encode()
    return body + b"a" * (size - len(body) - len(end)) + end, \
        f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def guarded(make_app, tmp_path):
    """An app with an admin token and a 128 KiB upload limit."""
    return make_app(FABLE_ADMIN_TOKEN=TOKEN, FABLE_TRAIN_UPLOAD_BYTES=128 * 1024,
                    FABLE_TRAIN_DIR=str(tmp_path / "runs")).test_client()


def post(client, path: str, authorization: str | None = None, size: int = BODY, **kwargs):
    body, content_type = multipart(size)
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    return client.post(path, data=body, headers=headers, **kwargs)


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", basic("anyone", TOKEN)])
def test_an_upload_with_the_token_may_pass_the_usual_limit(guarded, authorization):
    response = post(guarded, "/train", authorization)
    assert response.status_code != 413, response.get_data(as_text=True)[:300]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789",
                                           basic("anyone", "wrong")])
def test_an_upload_without_the_token_gets_413(guarded, authorization):
    response = post(guarded, "/train", authorization)
    assert response.status_code == 413
    assert response.json["error"] == "request body too large; the limit is 65536 bytes"


@pytest.mark.parametrize("path", ["/train/x", "/api/generate", "/nowhere"])
def test_other_paths_keep_the_usual_limit_even_with_the_token(guarded, path):
    """Refused before routing, whatever the path, as a chunked body is."""
    assert post(guarded, path, f"Bearer {TOKEN}").status_code == 413


def test_the_413_quotes_the_limit_that_applied(guarded):
    response = post(guarded, "/train", f"Bearer {TOKEN}", size=128 * 1024 + 1)
    assert response.status_code == 413
    assert response.json["error"] == "request body too large; the limit is 131072 bytes"


def test_without_an_admin_token_anyone_may_upload(make_app, tmp_path):
    client = make_app(FABLE_TRAIN_DIR=str(tmp_path / "runs")).test_client()
    assert post(client, "/train").status_code != 413
    assert post(client, "/api/generate").status_code == 413


def test_a_chunked_upload_is_read_to_the_requests_own_limit(guarded):
    """No Content-Length: _read_chunked_body reads it to this request's limit."""
    body, content_type = multipart()
    for authorization, refused in ((f"Bearer {TOKEN}", False), (None, True)):
        headers = {"Content-Type": content_type, "Transfer-Encoding": "chunked"}
        if authorization:
            headers["Authorization"] = authorization
        response = guarded.post("/train", input_stream=io.BytesIO(body), headers=headers,
                                environ_overrides={"CONTENT_LENGTH": ""})  # as gunicorn's
        assert (response.status_code == 413) is refused, response.status_code


# ---- a real gunicorn -----------------------------------------------------------------------

def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except OSError:  # the server answered and closed while we were still sending
            pass
        return read_answer(sock, 10)


@pytest.mark.server
def test_gunicorn_buffers_a_large_body_only_for_an_upload_with_the_token(checkpoint_dir,
                                                                         tmp_path):
    """With the token, the 100 KiB upload reaches the page whole (its 400: the minutes are
    not a number) and a head promising more than it sends waits in the worker's main loop
    until the read timeout (408); without the token the same head gets 413 at once."""
    body, content_type = multipart()
    env = {"FABLE_WORKERS": "1", "FABLE_TORCH_THREADS": "1", "FABLE_ADMIN_TOKEN": TOKEN,
           "FABLE_TRAIN_DIR": str(tmp_path / "runs"), "FABLE_READ_TIMEOUT_S": "2",
           "GUNICORN_GRACEFUL_TIMEOUT": "3"}

    def head(authorization: bytes, length: int = len(body)) -> bytes:
        return (b"POST /train HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
                + content_type.encode() + b"\r\n" + authorization
                + b"Content-Length: %d\r\n\r\n" % length)

    bearer = f"Authorization: Bearer {TOKEN}\r\n".encode()
    with GunicornServer(checkpoint_dir, env=env, log_path=tmp_path / "server.log") as server:
        answer = exchange(server.port, head(bearer) + body)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
        answer = exchange(server.port, head(bearer, len(body) + 1) + body)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
        answer = exchange(server.port, head(b"") + body)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
        assert b"connection: close" in answer.lower()
