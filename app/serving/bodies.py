"""A generation request's JSON body, read so that no body can hurt the server: a wrong
Content-Type, invalid UTF-8 or JSON, NaN, nesting deep enough to exhaust the parser's
recursion, an integer of thousands of digits: each a ``RequestError`` saying why.
"""

from __future__ import annotations

import json

from flask import Request

from app.serving.schema import RequestError, json_type


def read_json_object(req: Request) -> dict:
    """The request body as a JSON object.

    A body without a Content-Type is read as JSON (as Ollama does, for hand-written
    clients); any other type than ``application/json`` (or ``*+json``) is a 415. A body
    over ``MAX_CONTENT_LENGTH`` raises werkzeug's 413 from ``get_data``.
    """
    mimetype = req.mimetype
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise RequestError(None, f"Content-Type must be application/json, got {mimetype}",
                           status=415)
    raw = req.get_data(cache=True)
    if not raw.strip():
        raise RequestError(None, "request body is empty; send a JSON object")
    body = parse_json(raw, req.mimetype_params.get("charset", "utf-8"))
    if not isinstance(body, dict):
        raise RequestError(None, f"request body must be a JSON object, got {json_type(body)}")
    return body


MAX_JSON_DEPTH = 32  # no request body nests deeper; Python's parser would recurse to a crash


def parse_json(raw: bytes, charset: str = "utf-8"):
    """A request's JSON body, or ``RequestError`` saying why
    not: invalid UTF-8 or JSON, NaN or Infinity, nesting deeper than MAX_JSON_DEPTH, or a
    number too long to read."""
    try:
        text = raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        raise RequestError(None, "request body is not valid UTF-8") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
        raise RequestError(None, f"request body nests arrays and objects more than "
                                 f"{MAX_JSON_DEPTH} deep")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_int=_integer)
    except json.JSONDecodeError as e:
        raise RequestError(None, f"request body is not valid JSON: {e}") from None
    except ValueError as e:  # NaN / Infinity, an integer of thousands of digits
        raise RequestError(None, str(e)) from None


def _depth(text: str) -> int:
    """How deep brackets nest, strings skipped (a linear scan: no recursion to exhaust)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > 100:  # beyond any setting's range; int() would refuse at 4,300
        raise ValueError(f"request body has an integer of {len(digits)} digits; numbers "
                         f"here have at most 100")
    return int(digits)


def _refuse_constant(name: str):
    raise ValueError(f"request body is not valid JSON: {name} is not a JSON number")
