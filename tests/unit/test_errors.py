"""Responses the gateway makes itself: reason codes, JSON or HTML, CORS (pure)."""

from __future__ import annotations

import json

from gateway import errors
from tests.helpers import parse_head


def split(resp: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    status, _, headers = parse_head(head + b"\r\n\r\n")
    return status, {k.lower(): v for k, v in headers}, body


def test_json_with_reason_sandbox_and_port() -> None:
    status, h, body = split(errors.render(errors.SANDBOX_NOT_FOUND, sandbox_id="abc", port=3000))
    assert status == 502
    assert h[b"x-gateway-reason"] == b"sandbox_not_found"
    assert h[b"content-type"] == b"application/json"
    assert int(h[b"content-length"]) == len(body)
    assert json.loads(body) == {
        "reason": "sandbox_not_found",
        "message": errors.SANDBOX_NOT_FOUND.message,
        "sandboxId": "abc",
        "port": 3000,
    }


def test_port_not_open_page_reloads_itself() -> None:
    status, h, body = split(errors.render(errors.PORT_NOT_OPEN, sandbox_id="abc", port=3000, as_html=True))
    assert status == 502
    assert h[b"content-type"].startswith(b"text/html")
    assert h[b"retry-after"] == b"3"
    assert b'http-equiv="refresh"' in body and b"3000" in body and b"abc" in body


def test_cors_echoes_origin() -> None:
    _, h, _ = split(errors.render(errors.UNKNOWN_DOMAIN, origin=b"https://app.example"))
    assert h[b"access-control-allow-origin"] == b"https://app.example"
    assert h[b"vary"] == b"Origin"
    assert b"X-Gateway-Reason" in h[b"access-control-expose-headers"]


def test_head_only_and_close() -> None:
    resp = errors.render(errors.INVALID_HOST, head_only=True, close=True)
    _, h, body = split(resp)
    assert body == b"" and int(h[b"content-length"]) > 0 and h[b"connection"] == b"close"


def test_html_is_escaped() -> None:
    _, _, body = split(errors.render(errors.SANDBOX_NOT_FOUND, sandbox_id="<script>", as_html=True))
    assert b"<script>" not in body


def test_browser_detection() -> None:
    chrome_accept = b"text/html,application/xhtml+xml,*/*;q=0.8"
    assert errors.wants_html(b"navigate", None, None)
    assert not errors.wants_html(b"cors", chrome_accept, b"Mozilla/5.0")
    assert errors.wants_html(None, chrome_accept, b"Mozilla/5.0 (X11)")
    assert not errors.wants_html(None, chrome_accept, b"curl/8")
    assert not errors.wants_html(None, b"application/json, text/html", b"Mozilla/5.0")
    assert not errors.wants_html(None, None, None)


def test_every_reason_is_documented() -> None:
    with open("docs/reasons.md") as f:
        doc = f.read()
    for r in errors.REASONS.values():
        assert f"`{r.code}`" in doc and f"| {r.status} |" in doc, r.code
