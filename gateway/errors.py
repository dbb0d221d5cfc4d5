"""Reason codes and the responses the gateway makes itself (pure: no I/O).

Every response that does not come from a sandbox carries a machine-readable reason: the header
``X-Gateway-Reason`` and the JSON field ``reason``. Browsers navigating to a URL get a small HTML
page instead of JSON; scripts on another origin can read either, because the response echoes their
Origin (CORS, https://fetch.spec.whatwg.org/#http-cors-protocol).

The table of reasons below is the only place a status code is paired with a reason; docs/reasons.md
is generated from it (a test keeps the two equal).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from importlib import resources
from string import Template

from gateway.http import hdrs

__all__ = [
    "REASONS",
    "Reason",
    "render",
    "wants_html",
]


@dataclass(frozen=True, slots=True)
class Reason:
    """A reason code: what went wrong, the status it maps to, and a sentence for humans."""

    code: str
    status: int
    message: str
    retry_after: int | None = None


def _r(code: str, status: int, message: str, retry_after: int | None = None) -> Reason:
    return Reason(code, status, message, retry_after)


# Client errors: the request itself is wrong.
INVALID_HOST = _r("invalid_host", 400, "The Host header is not a valid sandbox host.")
INVALID_PORT = _r("invalid_port", 400, "The port in the host name must be 1-65535 in decimal.")
INVALID_SANDBOX_ID = _r("invalid_sandbox_id", 400, "The sandbox ID in the host name must be [a-z0-9]{1,64}.")
MALFORMED_REQUEST = _r("malformed_request", 400, "The request is not valid HTTP/1.1.")
INVALID_FRAMING = _r(
    "invalid_framing", 400, "The request's Content-Length/Transfer-Encoding framing is ambiguous or invalid."
)
PROXY_PROTOCOL_INVALID = _r(
    "proxy_protocol_invalid", 400, "This listener expects a valid PROXY protocol header before the request."
)
MISSING_ROUTING_HEADER = _r(
    "missing_routing_header", 400, "On a shared host both the sandbox ID and port fields are needed."
)
TRAFFIC_TOKEN_MISSING = _r("traffic_token_missing", 403, "This sandbox needs a traffic access token.")
TRAFFIC_TOKEN_INVALID = _r("traffic_token_invalid", 403, "The traffic access token is not this sandbox's.")
PORT_NOT_EXPOSED = _r("port_not_exposed", 403, "This port of the sandbox is not exposed.")
RESUME_DENIED = _r("resume_denied", 403, "The sandbox is paused and may not be resumed.")
UNKNOWN_DOMAIN = _r("unknown_domain", 404, "This host is not under a domain this gateway serves.")
METHOD_NOT_ALLOWED = _r("method_not_allowed", 405, "CONNECT is not supported by this gateway.")
BODY_TIMEOUT = _r(
    "body_timeout", 408, "The body moved slower than the gateway's minimum transfer rate (min_body_rate)."
)
REQUEST_TIMEOUT = _r("request_timeout", 408, "The request head did not arrive in time.")
SANDBOX_PAUSED = _r("sandbox_paused", 409, "The sandbox is paused.")
SANDBOX_TRANSITIONING = _r("sandbox_transitioning", 409, "The sandbox is starting, pausing, resuming or stopping.", 1)
TOO_MANY_CONNECTIONS = _r(
    "too_many_connections", 429, "This sandbox has too many open connections through this gateway.", 1
)
RESUME_RATE_LIMITED = _r("resume_rate_limited", 429, "Too many resumes of this sandbox; try again later.", 5)
HEAD_TOO_LARGE = _r("request_head_too_large", 431, "The request line or headers are too large.")
# The sandbox side: where the request should go is missing, unreachable or misbehaving.
SANDBOX_NOT_FOUND = _r("sandbox_not_found", 502, "No running sandbox has this ID.")
CATALOG_RECORD_INVALID = _r("catalog_record_invalid", 502, "The sandbox's routing record is invalid.")
PORT_NOT_OPEN = _r("port_not_open", 502, "No server is listening on this port in the sandbox yet.", 3)
UPSTREAM_CONNECT_FAILED = _r("upstream_connect_failed", 502, "The gateway could not connect to the sandbox.")
UPSTREAM_RESET = _r("upstream_reset", 502, "The sandbox closed the connection before answering.")
UPSTREAM_INVALID_RESPONSE = _r("upstream_invalid_response", 502, "The sandbox sent an invalid HTTP response.")
RESUME_FAILED = _r("resume_failed", 502, "Resuming the paused sandbox failed.")
CATALOG_UNAVAILABLE = _r("catalog_unavailable", 503, "The sandbox catalog is unreachable; try again shortly.", 1)
OVERLOADED = _r("overloaded", 503, "This gateway instance is at its connection limit; try again.", 1)
SHUTTING_DOWN = _r("shutting_down", 503, "This gateway instance is shutting down; try again.", 1)
UPSTREAM_CONNECT_TIMEOUT = _r("upstream_connect_timeout", 504, "Connecting to the sandbox timed out.")
RESUME_TIMEOUT = _r("resume_timeout", 504, "The sandbox did not come back from pause in time.", 5)
INTERNAL_ERROR = _r("internal_error", 500, "The gateway failed to handle this request.")

REASONS: dict[str, Reason] = {
    r.code: r
    for r in (
        INVALID_HOST,
        INVALID_PORT,
        INVALID_SANDBOX_ID,
        MALFORMED_REQUEST,
        INVALID_FRAMING,
        PROXY_PROTOCOL_INVALID,
        MISSING_ROUTING_HEADER,
        TRAFFIC_TOKEN_MISSING,
        TRAFFIC_TOKEN_INVALID,
        PORT_NOT_EXPOSED,
        RESUME_DENIED,
        UNKNOWN_DOMAIN,
        METHOD_NOT_ALLOWED,
        REQUEST_TIMEOUT,
        BODY_TIMEOUT,
        SANDBOX_PAUSED,
        SANDBOX_TRANSITIONING,
        TOO_MANY_CONNECTIONS,
        RESUME_RATE_LIMITED,
        HEAD_TOO_LARGE,
        SANDBOX_NOT_FOUND,
        CATALOG_RECORD_INVALID,
        PORT_NOT_OPEN,
        UPSTREAM_CONNECT_FAILED,
        UPSTREAM_RESET,
        UPSTREAM_INVALID_RESPONSE,
        RESUME_FAILED,
        CATALOG_UNAVAILABLE,
        OVERLOADED,
        SHUTTING_DOWN,
        UPSTREAM_CONNECT_TIMEOUT,
        RESUME_TIMEOUT,
        INTERNAL_ERROR,
    )
}

_PHRASES = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def _template(name: str) -> Template:
    return Template(resources.files("gateway").joinpath("templates", name).read_text("utf-8"))


_PAGE = _template("error.html")
_PORT_PAGE = _template("port_not_open.html")


def wants_html(sec_fetch_mode: bytes | None, accept: bytes | None, user_agent: bytes | None) -> bool:
    """Whether this request is a browser navigating to the URL (then it gets a page, not JSON).

    Sec-Fetch-Mode (https://w3c.github.io/webappsec-fetch-metadata/) settles it when present. Older
    browsers: an Accept that lists text/html before any JSON, from a User-Agent that says Mozilla/.
    """
    if sec_fetch_mode is not None:
        return sec_fetch_mode.strip().lower() == b"navigate"
    if accept is None or user_agent is None or not user_agent.startswith(b"Mozilla/"):
        return False
    a = accept.lower()
    i = a.find(b"text/html")
    if i < 0:
        return False
    j = a.find(b"json")
    return j < 0 or i < j


def render(
    reason: Reason,
    *,
    sandbox_id: str | None = None,
    port: int | None = None,
    detail: str | None = None,
    as_html: bool = False,
    origin: bytes | None = None,
    head_only: bool = False,
    close: bool = False,
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """The whole response (head and body) for ``reason``, ready to write to the client.

    ``close`` adds ``Connection: close`` (RFC 9112 §9.6): the gateway closes after it.
    ``head_only`` leaves the body out but keeps its Content-Length (a HEAD request, RFC 9110 §9.3.2).
    """
    message = detail or reason.message
    if as_html:
        body = _html_body(reason, message, sandbox_id, port).encode()
        ctype = b"text/html; charset=utf-8"
    else:
        doc: dict[str, object] = {"reason": reason.code, "message": message}
        if sandbox_id is not None:
            doc["sandboxId"] = sandbox_id
        if port is not None:
            doc["port"] = port
        body = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        ctype = b"application/json"
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (reason.status, _PHRASES.get(reason.status, b"Error")),
        b"Content-Type: %s\r\n" % ctype,
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
        hdrs.X_GATEWAY_REASON + b": " + reason.code.encode() + b"\r\n",
    ]
    if reason.retry_after is not None:
        lines.append(b"Retry-After: %d\r\n" % reason.retry_after)
    if reason.status == 405:
        lines.append(b"Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n")
    if origin is not None:
        lines += (
            b"Access-Control-Allow-Origin: " + origin + b"\r\n",
            b"Access-Control-Allow-Credentials: true\r\n",
            b"Access-Control-Expose-Headers: X-Gateway-Reason, Retry-After\r\n",
            b"Vary: Origin\r\n",
        )
    lines.extend(n + b": " + v + b"\r\n" for n, v in extra_headers)
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def _html_body(reason: Reason, message: str, sandbox_id: str | None, port: int | None) -> str:
    where = ""
    if sandbox_id is not None:
        where = f"sandbox <code>{html.escape(sandbox_id)}</code>"
        if port is not None:
            where += f", port <code>{port}</code>"
    if reason is PORT_NOT_OPEN:
        return _PORT_PAGE.substitute(
            port=html.escape(str(port if port is not None else "")),
            sandbox=html.escape(sandbox_id or ""),
            seconds=reason.retry_after or 3,
        )
    return _PAGE.substitute(
        status=reason.status,
        title=html.escape(_PHRASES.get(reason.status, b"Error").decode()),
        message=html.escape(message),
        reason=html.escape(reason.code),
        where=where,
    )
