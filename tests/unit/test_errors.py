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
    # Never credentials (issue 10): whatever the reason, a preflight's answer included.
    for reason in errors.REASONS.values():
        resp = errors.render(reason, origin=b"https://app.example")
        assert b"Access-Control-Allow-Credentials" not in resp, reason.code


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


def page(reason: errors.Reason, **kw: object) -> str:
    status, h, body = split(errors.render(reason, as_html=True, **kw))  # type: ignore[arg-type]
    assert status == reason.status and h[b"x-gateway-reason"] == reason.code.encode()  # kept for tools
    return body.decode()


def test_pages_have_plain_titles_next_steps_and_reloads() -> None:
    expected = {"expected": "https://{port}-{sandboxId}.e2b.dev/"}
    cases = [
        # reason, title, a phrase that must be there, reload seconds
        (errors.SANDBOX_NOT_FOUND, "Sandbox not found", "Check the sandbox ID", None),
        (errors.SANDBOX_PAUSED, "Sandbox is paused", "resume it", "10"),
        (errors.transitioning("starting"), "Starting…", "The sandbox is starting.", "2"),
        (errors.transitioning("resuming"), "Resuming…", "resuming", "2"),
        (errors.transitioning("pausing"), "Pausing…", "paused", "2"),
        (errors.transitioning("stopping"), "Stopping…", "stopped", "2"),
        (errors.RESUME_TIMEOUT, "Resuming…", "reloads by itself", "5"),
        (errors.PORT_NOT_OPEN, "Port 3000 is not open yet", "nothing listens on port", "3"),
        (errors.INVALID_HOST, "Not a sandbox address", "https://{port}-{sandboxId}.e2b.dev/", None),
        (errors.NO_SANDBOX_IN_HOST, "No sandbox at this address", "https://{port}-{sandboxId}.e2b.dev/", None),
        (errors.TRAFFIC_TOKEN_MISSING, "This sandbox is private", "?e2b_access=", None),
        (errors.TRAFFIC_TOKEN_INVALID, "Access link expired", "new access link", None),
        (errors.CATALOG_UNAVAILABLE, "Temporarily unavailable", "reloads by itself", "2"),
    ]
    for reason, title, phrase, refresh in cases:
        body = page(reason, sandbox_id="abc", port=3000, hints=expected)
        assert f"<title>{title}</title>" in body and f"<h1>{title}</h1>" in body, reason
        assert phrase in body, (reason, body)
        assert (f'<meta http-equiv="refresh" content="{refresh}">' in body) is (refresh is not None), reason
        assert f"HTTP {reason.status} · reason <code>{reason.code}</code>" in body
        assert '<link rel="icon" href="data:,">' in body  # no /favicon.ico request from an error page


def test_detail_replaces_the_text_and_is_escaped() -> None:
    body = page(errors.TRAFFIC_TOKEN_INVALID, detail="The access cookie is not accepted from <script>x</script>")
    assert "<script>x" not in body and "&lt;script&gt;x" in body


def test_favicon_gets_an_empty_404_with_the_reason() -> None:
    status, h, body = split(errors.render(errors.SANDBOX_PAUSED, as_html=True, favicon=True))
    assert (status, body, h[b"content-length"], h[b"x-gateway-reason"]) == (404, b"", b"0", b"sandbox_paused")
    assert errors.is_favicon(b"GET", b"/favicon.ico?v=2") and errors.is_favicon(b"HEAD", b"/favicon.ico")
    assert not errors.is_favicon(b"POST", b"/favicon.ico") and not errors.is_favicon(b"GET", b"/img/favicon.ico")


def test_a_204_has_neither_body_nor_length() -> None:
    resp = errors.render(errors.CORS_PREFLIGHT, origin=b"https://a.example", extra_headers=((b"Vary", b"X"),))
    head, _, body = resp.partition(b"\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 204 No Content\r\n") and body == b""
    assert b"content-length" not in head.lower() and b"content-type" not in head.lower()
