"""Reason codes and the responses the gateway makes itself (pure: no I/O).

Every response that does not come from a sandbox carries a machine-readable reason: the header
``X-Gateway-Reason`` and the JSON field ``reason``. Browsers navigating to a URL get a small HTML
page instead of JSON; scripts on another origin can read either, because the response echoes their
Origin (CORS, https://fetch.spec.whatwg.org/#http-cors-protocol). It never adds
``Access-Control-Allow-Credentials``: a page on any origin may read why a request failed, but never
a response made for a request that carried the browser's credentials (cookies) for the sandbox.

The table of reasons below is the only place a status code is paired with a reason; docs/reasons.md
is generated from it (a test keeps the two equal).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from string import Template

from gateway.http import hdrs

__all__ = [
    "REASONS",
    "Reason",
    "render",
    "transitioning",
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


# Answers that are not errors: the gateway itself grants what the request asks.
CORS_PREFLIGHT = _r(
    "cors_preflight", 204, "A CORS preflight for a private sandbox, answered by the gateway (it carries no token)."
)
ACCESS_LINK_ACCEPTED = _r(
    "access_link_accepted", 303, "The access link was exchanged for a cookie; the same URL without it follows."
)
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
INVALID_ROUTING_HEADER = _r(
    "invalid_routing_header",
    400,
    "A routing field was sent twice, or is not a port (1-65535) or a sandbox ID ([a-z0-9]{1,64}).",
)
# The same code, for a request that sent neither field: most likely a person at the bare address.
NO_SANDBOX_IN_HOST = _r(
    "missing_routing_header", 400, "This address names no sandbox (and the request has no sandbox routing fields)."
)
TRAFFIC_TOKEN_MISSING = _r("traffic_token_missing", 403, "This sandbox needs a traffic access token.")
TRAFFIC_TOKEN_INVALID = _r("traffic_token_invalid", 403, "The traffic access token is not this sandbox's.")
PORT_NOT_EXPOSED = _r("port_not_exposed", 403, "This port of the sandbox is not exposed.")
RESUME_DENIED = _r("resume_denied", 403, "The sandbox is paused and may not be resumed.")
UPSTREAM_IS_GATEWAY = _r(
    "upstream_is_gateway", 403, "The sandbox's address is one of this gateway's own listeners: it is not connected to."
)
UNKNOWN_DOMAIN = _r("unknown_domain", 404, "This host is not under a domain this gateway serves.")
METHOD_NOT_ALLOWED = _r("method_not_allowed", 405, "CONNECT is not supported by this gateway.")
BODY_TIMEOUT = _r(
    "body_timeout", 408, "The body moved slower than the gateway's minimum transfer rate (min_body_rate)."
)
REQUEST_TIMEOUT = _r("request_timeout", 408, "The request head did not arrive in time.")
SANDBOX_PAUSED = _r("sandbox_paused", 409, "The sandbox is paused.")
SANDBOX_TRANSITIONING = _r("sandbox_transitioning", 409, "The sandbox is starting, pausing, resuming or stopping.", 1)
# The same code per state, so the message (and the browser page) says which.
_TRANSITIONS = {
    s: _r("sandbox_transitioning", 409, f"The sandbox is {s}.", 1)
    for s in ("starting", "pausing", "resuming", "stopping")
}
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
UPSTREAM_RESPONSE_TIMEOUT = _r(
    "upstream_response_timeout", 504, "The sandbox did not send its response head in time (response_head_timeout)."
)
RESUME_TIMEOUT = _r("resume_timeout", 504, "The sandbox did not come back from pause in time.", 5)
INTERNAL_ERROR = _r("internal_error", 500, "The gateway failed to handle this request.")

REASONS: dict[str, Reason] = {
    r.code: r
    for r in (
        CORS_PREFLIGHT,
        ACCESS_LINK_ACCEPTED,
        INVALID_HOST,
        INVALID_PORT,
        INVALID_SANDBOX_ID,
        MALFORMED_REQUEST,
        INVALID_FRAMING,
        PROXY_PROTOCOL_INVALID,
        MISSING_ROUTING_HEADER,
        INVALID_ROUTING_HEADER,
        TRAFFIC_TOKEN_MISSING,
        TRAFFIC_TOKEN_INVALID,
        PORT_NOT_EXPOSED,
        RESUME_DENIED,
        UPSTREAM_IS_GATEWAY,
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
        UPSTREAM_RESPONSE_TIMEOUT,
        RESUME_TIMEOUT,
        INTERNAL_ERROR,
    )
}

_PHRASES = {
    204: b"No Content",
    303: b"See Other",
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


def transitioning(state: str) -> Reason:
    """``sandbox_transitioning`` for a record in ``state`` (its message names the state)."""
    return _TRANSITIONS.get(state, SANDBOX_TRANSITIONING)


@dataclass(frozen=True, slots=True)
class _Page:
    """What a person sees for a reason: a plain title, what happened, what to do next, and whether
    the page reloads itself (where waiting helps). Texts are HTML; ``{name}`` takes a hint, escaped."""

    title: str
    text: str
    next: str = ""
    refresh: int | None = None


_ADDRESS = "Sandbox addresses look like <code>{expected}</code>."
_NOT_YOURS = "This is a problem on the platform's side, not with what you did."
_PRIVATE_NEXT = (
    "To open it in a browser, use an access link from the sandbox's owner (an address ending in "
    "<code>?{param}=…</code>); programs send the token in the <code>{header}</code> header."
)
_LATER = "This page reloads by itself and shows the app once the sandbox can answer."
_PAGES: dict[Reason, _Page] = {
    INVALID_HOST: _Page("Not a sandbox address", "This address does not name a sandbox.", _ADDRESS),
    INVALID_PORT: _Page("Not a sandbox address", "The port in this address must be 1-65535.", _ADDRESS),
    INVALID_SANDBOX_ID: _Page(
        "Not a sandbox address", "A sandbox ID is made of lowercase letters and digits only.", _ADDRESS
    ),
    UNKNOWN_DOMAIN: _Page("Not a sandbox address", "This gateway serves no sandboxes under this domain.", _ADDRESS),
    MISSING_ROUTING_HEADER: _Page("Not a sandbox address", MISSING_ROUTING_HEADER.message, _ADDRESS),
    INVALID_ROUTING_HEADER: _Page(
        "Not a sandbox address", "A sandbox routing field was sent twice, or is not a port or a sandbox ID.", _ADDRESS
    ),
    NO_SANDBOX_IN_HOST: _Page(
        "No sandbox at this address", "This address reaches the sandbox gateway itself, not a sandbox.", _ADDRESS
    ),
    TRAFFIC_TOKEN_MISSING: _Page(
        "This sandbox is private", "It can be opened only with access from its owner.", _PRIVATE_NEXT
    ),
    TRAFFIC_TOKEN_INVALID: _Page(
        "Access link expired",
        "Your access to this sandbox has expired or was revoked.",
        "Ask whoever shared the link for a new access link and open it: it gives this browser access again.",
    ),
    PORT_NOT_EXPOSED: _Page("Port not available", "This port of the sandbox is not open to the internet."),
    RESUME_DENIED: _Page(
        "Sandbox is paused",
        "The sandbox is paused and may not be resumed from here.",
        "Its owner can resume it (for example with the SDK's <code>Sandbox.connect</code>).",
    ),
    SANDBOX_PAUSED: _Page(
        "Sandbox is paused",
        "The sandbox is paused: its apps are not running.",
        "Its owner can resume it (for example with the SDK's <code>Sandbox.connect</code>). "
        "This page reloads by itself and shows the app once the sandbox runs again.",
        10,
    ),
    _TRANSITIONS["starting"]: _Page("Starting…", "The sandbox is starting.", _LATER, 2),
    _TRANSITIONS["resuming"]: _Page("Resuming…", "The sandbox is resuming from pause.", _LATER, 2),
    _TRANSITIONS["pausing"]: _Page("Pausing…", "The sandbox is being paused.", _LATER, 2),
    _TRANSITIONS["stopping"]: _Page("Stopping…", "The sandbox is being stopped.", _LATER, 2),
    SANDBOX_TRANSITIONING: _Page("Please wait…", "The sandbox is changing state.", _LATER, 2),
    TOO_MANY_CONNECTIONS: _Page("Too many connections", TOO_MANY_CONNECTIONS.message, _LATER, 2),
    RESUME_RATE_LIMITED: _Page("Resuming…", "The sandbox was resumed too often in a short time.", _LATER, 5),
    RESUME_TIMEOUT: _Page("Resuming…", "The sandbox is taking long to resume.", _LATER, 5),
    SANDBOX_NOT_FOUND: _Page(
        "Sandbox not found",
        "There is no running sandbox with this ID.",
        "It may have been stopped, or killed when its time ran out; or the address is mistyped. "
        "Check the sandbox ID in the address, or start a new sandbox.",
    ),
    CATALOG_RECORD_INVALID: _Page(
        "Sandbox unavailable", "The platform's record of this sandbox is invalid.", _NOT_YOURS
    ),
    PORT_NOT_OPEN: _Page(
        "Port {port} is not open yet",
        "The sandbox is running, but nothing listens on port <code>{port}</code> inside it yet. "
        "If you just started a server there, it is probably still booting.",
        "This page reloads by itself and shows the app as soon as the port opens.",
        3,
    ),
    UPSTREAM_CONNECT_FAILED: _Page("Sandbox unreachable", "The gateway could not connect to the sandbox.", _NOT_YOURS),
    UPSTREAM_CONNECT_TIMEOUT: _Page("Sandbox unreachable", "Connecting to the sandbox timed out.", _NOT_YOURS),
    UPSTREAM_RESET: _Page(
        "The app closed the connection",
        "The app in the sandbox closed the connection without "
        "answering. It may have crashed or restarted; reloading may help.",
    ),
    UPSTREAM_INVALID_RESPONSE: _Page("The app answered wrongly", "The app in the sandbox sent an invalid HTTP answer."),
    UPSTREAM_IS_GATEWAY: _Page(
        "Sandbox unreachable", "The platform's record of this sandbox points at the gateway itself.", _NOT_YOURS
    ),
    RESUME_FAILED: _Page("Could not resume the sandbox", "Resuming the paused sandbox failed.", _NOT_YOURS),
    CATALOG_UNAVAILABLE: _Page("Temporarily unavailable", "The gateway cannot look up sandboxes right now.", _LATER, 2),
    OVERLOADED: _Page("Temporarily unavailable", "This gateway is at its connection limit.", _LATER, 2),
    SHUTTING_DOWN: _Page("Temporarily unavailable", "This gateway instance is restarting.", _LATER, 2),
    ACCESS_LINK_ACCEPTED: _Page("Opening the sandbox…", "Access granted.", '<a href="{location}">Continue</a>.'),
    INTERNAL_ERROR: _Page("Gateway error", "The gateway failed to handle this request.", _NOT_YOURS),
}
_DEFAULT_HINTS = {
    "expected": "https://{port}-{sandboxId}.{domain}/",
    "param": "e2b_access",
    "header": "e2b-traffic-access-token",
    "location": "/",
}


def _template(name: str) -> Template:
    return Template(resources.files("gateway").joinpath("templates", name).read_text("utf-8"))


_PAGE = _template("error.html")


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


def is_favicon(method: bytes, target: bytes) -> bool:
    """A browser's automatic icon request (``GET /favicon.ico``): an error page is not an icon."""
    return method in (b"GET", b"HEAD") and target.split(b"?", 1)[0] == b"/favicon.ico"


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
    hints: Mapping[str, str] | None = None,
    favicon: bool = False,
) -> bytes:
    """The whole response (head and body) for ``reason``, ready to write to the client.

    ``close`` adds ``Connection: close`` (RFC 9112 §9.6): the gateway closes after it.
    ``head_only`` leaves the body out but keeps its Content-Length (a HEAD request, RFC 9110 §9.3.2).
    ``hints`` fill in the page's texts (the expected address form, the access link's parameter).
    ``favicon``: the request was a browser's icon fetch; an error is an empty 404 (one page per error,
    no second one rendered as an icon), the reason still in ``X-Gateway-Reason``.
    """
    message = detail or reason.message
    status = reason.status
    if favicon and status >= 400:
        status, body, ctype = 404, b"", None
    elif status == 204:  # no content, and no Content-Length either (RFC 9110 §8.6)
        body, ctype = b"", None
    elif as_html:
        body = _html_body(reason, message, detail, sandbox_id, port, hints).encode()
        ctype = b"text/html; charset=utf-8"
    else:
        doc: dict[str, object] = {"reason": reason.code, "message": message}
        if sandbox_id is not None:
            doc["sandboxId"] = sandbox_id
        if port is not None:
            doc["port"] = port
        body = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        ctype = b"application/json"
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"Error"))]
    if ctype is not None:
        lines.append(b"Content-Type: %s\r\n" % ctype)
    if status != 204:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines += (
        b"Cache-Control: no-store\r\n",
        hdrs.X_GATEWAY_REASON + b": " + reason.code.encode() + b"\r\n",
    )
    if reason.retry_after is not None:
        lines.append(b"Retry-After: %d\r\n" % reason.retry_after)
    if reason.status == 405:
        lines.append(b"Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n")
    if origin is not None:
        lines += (
            b"Access-Control-Allow-Origin: " + origin + b"\r\n",
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


def _html_body(
    reason: Reason,
    message: str,
    detail: str | None,
    sandbox_id: str | None,
    port: int | None,
    hints: Mapping[str, str] | None,
) -> str:
    values = {
        **_DEFAULT_HINTS,
        **(hints or {}),
        "port": str(port) if port is not None else "",
        "sandbox": sandbox_id or "",
    }
    safe = {k: html.escape(v) for k, v in values.items()}
    page = _PAGES.get(reason)
    if page is None:
        page = _Page(_PHRASES.get(reason.status, b"Error").decode(), html.escape(message))
    text = html.escape(detail) if detail else page.text.format_map(safe)
    where = []
    if sandbox_id is not None:
        where.append(f"sandbox <code>{safe['sandbox']}</code>")
    if port is not None:
        where.append(f"port <code>{port}</code>")
    return _PAGE.substitute(
        title=page.title.format_map(safe),
        refresh=f'<meta http-equiv="refresh" content="{page.refresh}">' if page.refresh else "",
        text=text,
        next=f"<p>{page.next.format_map(safe)}</p>\n" if page.next else "",
        where=f"<p><small>{', '.join(where)}</small></p>\n" if where else "",
        status=reason.status,
        reason=html.escape(reason.code),
    )
