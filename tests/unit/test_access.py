"""Access links and cookies (pure): the signed format, verification, and the field-value surgery
that cuts what the gateway consumed while keeping every other byte."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import urljoin

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import access
from gateway.access import COOKIE, LINK, Grant, mint, verify

TOKEN = b"tok-of-priv"
NOW = 1_767_000_000
EXP = 1_767_225_600
# The documented example (docs/catalog.md), also checked with openssl and node's crypto:
#   printf %s 'e2b-access-link:v1.abc123.3000.1767225600' | openssl dgst -sha256 -hmac tok-of-priv -binary | base64
VECTOR = "v1.abc123.3000.1767225600.MBnbxVihe1LfayZcwEmd2tOnaybLk9dkVxqZINrscEY"


def independent_mint(token: bytes, purpose: str, sandbox_id: str, port: int, expires: int) -> str:
    """The documented recipe, written again without the module's helpers."""
    payload = f"v1.{sandbox_id}.{port}.{expires}"
    mac = hmac.new(token, f"{purpose}:{payload}".encode(), hashlib.sha256).digest()
    return payload + "." + base64.urlsafe_b64encode(mac).decode().rstrip("=")


def test_the_documented_vector() -> None:
    assert mint("tok-of-priv", LINK, "abc123", 3000, EXP) == VECTOR
    assert verify(TOKEN, LINK, VECTOR.encode(), "abc123", 3000, NOW) == Grant("abc123", 3000, EXP)


@given(
    token=st.binary(min_size=1, max_size=64),
    sandbox_id=st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=64),
    port=st.integers(0, 65535),
    expires=st.integers(0, 10**12 - 1),
    purpose=st.sampled_from([LINK, COOKIE]),
)
def test_mint_follows_the_recipe_and_verifies(
    token: bytes, sandbox_id: str, port: int, expires: int, purpose: str
) -> None:
    value = mint(token, purpose, sandbox_id, port, expires)
    assert value == independent_mint(token, purpose, sandbox_id, port, expires)
    on = port or 443  # port 0 is "any port": it verifies on every port
    assert verify(token, purpose, value.encode(), sandbox_id, on, expires - 1) == Grant(sandbox_id, port, expires)
    # Characters that survive any URL or cookie encoder unchanged (RFC 3986 §2.3, RFC 6265 §4.1.1).
    assert set(value) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@given(st.data())
def test_any_changed_byte_is_refused(data: st.DataObject) -> None:
    value = bytearray(VECTOR.encode())
    i = data.draw(st.integers(0, len(value) - 1))
    b = data.draw(st.integers(0, 255).filter(lambda b: b != value[i]))
    value[i] = b
    assert isinstance(verify(TOKEN, LINK, bytes(value), "abc123", 3000, NOW), str)


@pytest.mark.parametrize(
    ("value", "sandbox_id", "port", "now", "problem"),
    [
        (VECTOR, "abc123", 3000, NOW, None),
        (VECTOR, "abc123", 3000, EXP - 1, None),
        (VECTOR, "abc123", 3000, EXP, "has expired"),  # expires is the first second it is invalid
        (VECTOR, "abc123", 3001, NOW, "another port"),
        (VECTOR, "abc124", 3000, NOW, "another sandbox"),
        (VECTOR.replace(".3000.", ".3001."), "abc123", 3001, NOW, "altered"),  # port changed, MAC kept
        (VECTOR.replace(".1767225600.", ".1767225601."), "abc123", 3000, NOW, "altered"),  # expiry pushed
        (VECTOR.replace("v1.", "v2."), "abc123", 3000, NOW, "malformed"),
        (VECTOR.replace(".3000.", ".03000."), "abc123", 3000, NOW, "malformed"),  # one spelling per number
        (VECTOR.replace(".3000.", ".+3000."), "abc123", 3000, NOW, "malformed"),
        (VECTOR.replace(".3000.", ".65536."), "abc123", 3000, NOW, "malformed"),
        (VECTOR.replace("abc123", "ABC123"), "abc123", 3000, NOW, "malformed"),
        (VECTOR + "=", "abc123", 3000, NOW, "malformed"),  # padding: one spelling of the MAC
        (VECTOR[:-1], "abc123", 3000, NOW, "malformed"),
        (VECTOR + ".x", "abc123", 3000, NOW, "malformed"),
        ("", "abc123", 3000, NOW, "malformed"),
        ("v1....", "abc123", 3000, NOW, "malformed"),
        (mint(TOKEN, COOKIE, "abc123", 3000, EXP), "abc123", 3000, NOW, "altered"),  # a cookie is no link
        (mint(b"rotated", LINK, "abc123", 3000, EXP), "abc123", 3000, NOW, "token has changed"),
        (mint(TOKEN, LINK, "abc123", 0, EXP), "abc123", 1, NOW, None),  # any port
        (mint(TOKEN, LINK, "abc123", 0, EXP), "abc123", 65535, NOW, None),
    ],
)
def test_verify(value: str, sandbox_id: str, port: int, now: int, problem: str | None) -> None:
    got = verify(TOKEN, LINK, value.encode(), sandbox_id, port, now)
    if problem is None:
        assert isinstance(got, Grant)
    else:
        assert isinstance(got, str) and problem in got, got


def test_cookie_problems_say_cookie() -> None:
    c = mint(TOKEN, COOKIE, "abc123", 3000, EXP)
    assert verify(TOKEN, COOKIE, c.encode(), "abc123", 3000, EXP) == "The access cookie has expired."
    assert verify(TOKEN, COOKIE, c.encode(), "abc123", 3000, NOW) == Grant("abc123", 3000, EXP)


@pytest.mark.parametrize(
    ("sandbox_id", "port", "expires"),
    [("", 1, 1), ("ABC", 1, 1), ("a.b", 1, 1), ("abc", -1, 1), ("abc", 65536, 1), ("abc", 1, -1), ("abc", 1, 10**12)],
)
def test_mint_refuses_what_cannot_verify(sandbox_id: str, port: int, expires: int) -> None:
    with pytest.raises(ValueError):
        mint(TOKEN, LINK, sandbox_id, port, expires)


N = b"e2b_access"


@pytest.mark.parametrize(
    ("target", "values", "rest"),
    [
        (b"/", [], b"/"),
        (b"/p?e2b_access=v", [b"v"], b"/p"),
        (b"/p?a=1&e2b_access=v&b=2", [b"v"], b"/p?a=1&b=2"),
        (b"/p?e2b_access=v&b=2&a=1", [b"v"], b"/p?b=2&a=1"),
        (b"/p?b=%2F+x&e2b_access=v", [b"v"], b"/p?b=%2F+x"),  # others keep their encoding
        (b"/p?a&&e2b_access=v&", [b"v"], b"/p?a&&"),  # even empty items stay
        (b"/p?e2b_access=a&e2b_access=b", [b"a", b"b"], b"/p"),
        (b"/p?e2b_access", [b""], b"/p"),
        (b"/p?e2b_access=v%2Ex", [b"v.x"], b"/p"),  # percent-decoded value
        (b"/p?x_e2b_access=v", [], b"/p?x_e2b_access=v"),  # a longer key is another parameter
        (b"/p?q=e2b_access=v", [], b"/p?q=e2b_access=v"),  # inside another value
        (b"/e2b_access=v", [], b"/e2b_access=v"),  # the path is not the query
        (b"http://h/p?e2b_access=v&a=1", [b"v"], b"http://h/p?a=1"),
    ],
)
def test_take_param(target: bytes, values: list[bytes], rest: bytes) -> None:
    assert access.take_param(target, N) == (values, rest)


_item = st.from_regex(rb"\A[a-zA-Z0-9%+._~-]{0,6}(=[a-zA-Z0-9%+._~=-]{0,6})?\Z").filter(
    lambda b: b.partition(b"=")[0] != N
)


@given(
    path=st.from_regex(rb"\A/[a-z/]{0,8}\Z"),
    others=st.lists(_item, max_size=6),
    ours=st.lists(st.tuples(st.integers(0, 6), st.from_regex(rb"\A[A-Za-z0-9._-]{0,12}\Z")), min_size=1, max_size=3),
)
def test_take_param_keeps_every_other_parameter_in_order(
    path: bytes, others: list[bytes], ours: list[tuple[int, bytes]]
) -> None:
    items = list(others)
    for pos, v in ours:
        items.insert(min(pos, len(items)), N + b"=" + v)
    values, rest = access.take_param(path + b"?" + b"&".join(items), N)
    assert sorted(values) == sorted(v for _, v in ours)
    kept = b"&".join(others)
    assert rest == (path + b"?" + kept if kept else path)


@pytest.mark.parametrize(
    ("value", "found", "rest"),
    [
        (b"a=1; b=2", [], b"a=1; b=2"),
        (b"e2b_access=X", [b"X"], None),
        (b"e2b_access=X; a=1; b=2", [b"X"], b"a=1; b=2"),
        (b"a=1; e2b_access=X; b=2", [b"X"], b"a=1; b=2"),
        (b"a=1; b=2; e2b_access=X", [b"X"], b"a=1; b=2"),
        (b"a=1;e2b_access=X;b=2", [b"X"], b"a=1;b=2"),  # the client's separators stay
        (b"E2B_ACCESS=X; a=1", [], b"E2B_ACCESS=X; a=1"),  # cookie names are case-sensitive
        (b"e2b_accessx=1; xe2b_access=2", [], b"e2b_accessx=1; xe2b_access=2"),
        (b"e2b_access=X; e2b_access=Y", [b"X", b"Y"], None),
        (b"a=e2b_access=X", [], b"a=e2b_access=X"),
    ],
)
def test_take_cookies(value: bytes, found: list[bytes], rest: bytes | None) -> None:
    assert access.take_cookies(value, N) == (found, rest)


_pair = st.from_regex(rb"\A[A-Za-z0-9_!#$%&'*+.^`|~-]{1,8}=[A-Za-z0-9!#$%&'()*+./:<=>?@\[\]^_`{|}~-]{0,10}\Z").filter(
    lambda p: p.partition(b"=")[0] != N
)


@given(
    others=st.lists(_pair, max_size=6),
    ours=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    sep=st.sampled_from([b"; ", b";", b";  "]),
)
def test_take_cookies_keeps_the_apps_cookies_byte_for_byte(others: list[bytes], ours: list[int], sep: bytes) -> None:
    pairs = list(others)
    for i, pos in enumerate(ours):
        pairs.insert(min(pos, len(pairs)), N + b"=v" + str(i).encode())
    found, rest = access.take_cookies(sep.join(pairs), N)
    assert sorted(found) == sorted(b"v" + str(i).encode() for i in range(len(ours)))
    assert rest == (sep.join(others) if others else None)  # what the browser sends without our cookie


@pytest.mark.parametrize(
    ("value", "found", "rest"),
    [
        (b"e2b-token.T", [b"T"], None),
        (b"vite-hmr, e2b-token.T", [b"T"], b"vite-hmr"),
        (b"e2b-token.T, vite-hmr,chat", [b"T"], b"vite-hmr,chat"),
        (b"chat", [], b"chat"),
        (b"x-e2b-token.T", [], b"x-e2b-token.T"),
    ],
)
def test_take_subprotocols(value: bytes, found: list[bytes], rest: bytes | None) -> None:
    assert access.take_subprotocols(value, b"e2b-token.") == (found, rest)


@pytest.mark.parametrize(
    ("target", "loc"),
    [
        (b"/", b"/"),
        (b"/a/b?x=1", b"/a/b?x=1"),
        (b"//evil.example/x", b"/.//evil.example/x"),  # not a network-path reference
        (b"/\\evil.example/x", b"/./\\evil.example/x"),  # browsers read "/\" as "//"
        (b"/\t/evil.example/x", b"/./\t/evil.example/x"),  # ... and drop tabs and newlines first
        (b"http://3000-abc.e2b.dev/p?a=1", b"/p?a=1"),
        (b"http://3000-abc.e2b.dev?a=1", b"/?a=1"),
        (b"http://3000-abc.e2b.dev", b"/"),
        (b"http://3000-abc.e2b.dev//evil.example/", b"/.//evil.example/"),
    ],
)
def test_location_stays_on_the_host(target: bytes, loc: bytes) -> None:
    assert access.location(target) == loc
    resolved = urljoin("https://3000-abc.e2b.dev/start", loc.decode().replace("\\", "/"))
    assert resolved.startswith("https://3000-abc.e2b.dev/")


def test_set_cookie_is_host_only_httponly_lax() -> None:
    c = access.set_cookie(N, b"v1.x", 3600, secure=False)
    assert c == b"e2b_access=v1.x; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"
    assert b"domain" not in c.lower()  # host-only: never sent to another sandbox's host (RFC 6265 §5.3 step 6)
    assert access.set_cookie(N, b"v1.x", 5, secure=True).endswith(b"; Secure")


@given(st.binary(max_size=200), st.sampled_from([LINK, COOKIE]), st.floats(0, 2e10))
def test_verify_never_raises_on_hostile_input(value: bytes, purpose: str, now: float) -> None:
    assert isinstance(verify(TOKEN, purpose, value, "abc123", 3000, now), str)


@given(st.binary(max_size=200))
def test_surgery_never_raises_and_changes_nothing_it_did_not_find(value: bytes) -> None:
    for found, rest in (access.take_cookies(value, N), access.take_subprotocols(value, b"e2b-token.")):
        assert found or rest == value
    found, target = access.take_param(b"/" + value, N)
    assert found or target == b"/" + value


@given(st.lists(st.sampled_from([b"/", b"\\", b"\t", b"\n", b"\r", b"a", b".", b"?", b":"]), max_size=8).map(b"".join))
def test_location_is_never_a_network_path(path: bytes) -> None:
    loc = access.location(b"/" + path).translate(None, b"\t\r\n")  # as a browser reads it (WHATWG URL)
    assert loc.startswith(b"/") and loc[1:2] not in (b"/", b"\\")
