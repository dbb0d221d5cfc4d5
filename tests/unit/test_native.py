"""The compiled data plane (gateway/native.py): which build runs, a stale build is found, and
GATEWAY_PURE=1 runs the sources."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import native

_PROBE = (
    "import json, gateway, gateway.http.http2, gateway.hostname; from gateway import native; "
    "print(json.dumps([gateway.http.http2.__file__, gateway.hostname.__file__, native.status().compiled]))"
)


def _probe(pure: bool) -> tuple[str, str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_PURE"}
    if pure:
        env["GATEWAY_PURE"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    http2, hostname, compiled = json.loads(out.stdout)
    return http2, hostname, compiled


def test_pure_runs_the_sources_whatever_was_built() -> None:
    http2, hostname, compiled = _probe(pure=True)
    assert http2.endswith("http2.py") and hostname.endswith("hostname.py")
    assert compiled == []


def test_the_build_that_runs_is_the_one_status_reports() -> None:
    http2, hostname, compiled = _probe(pure=False)
    built = native.status()
    assert compiled == list(built.compiled)
    assert ("gateway.http.http2" in compiled) == (not http2.endswith(".py"))
    assert ("gateway.hostname" in compiled) == (not hostname.endswith(".py"))
    if os.environ.get("CI"):  # (CI installs a C compiler: make install compiles every module)
        assert compiled == list(native.COMPILED)


def test_a_source_changed_after_the_build_is_stale(tmp_path: Path) -> None:
    built = native.status()
    if not built.compiled:
        pytest.skip("pure Python build: nothing compiled can be stale")
    assert built.stale == ()
    recorded = dict(line.split() for line in native.SUMS.read_text().splitlines())
    # Any source of the package counts, compiled or not (compiled code relies on what it inferred
    # from the modules it imports: config.py's types, for one).
    assert {"config.py", "http/http2.py", "http/h2conn.py"} <= recorded.keys()
    for edited in ("config.py", "http/http2.py"):
        sums = tmp_path / edited.replace("/", "_")
        sums.write_text("".join(f"{p} {'0' * 64 if p == edited else h}\n" for p, h in recorded.items()))
        assert native.status(sums).stale == (edited,)
    gone = tmp_path / "gone"
    gone.write_text("".join(f"{p} {h}\n" for p, h in recorded.items() if p != "http/flow.py"))
    assert native.status(gone).stale == ("http/flow.py",)  # (a source added since the build)
    assert set(native.status(tmp_path / "missing").stale) == set(recorded)  # no sums: all stale


_FUZZ_PROBE = (
    "import atheris\n"
    "with atheris.instrument_imports(include=['gateway']):\n"
    "    import gateway.http.framing, gateway.http.headers\n"
    "print(type(gateway.http.framing.__loader__).__name__, type(gateway.http.headers.__loader__).__name__)\n"
)


def test_the_fuzzers_instrument_the_pure_modules() -> None:
    """atheris's import hook asks the finders after itself: GATEWAY_PURE's finder must be one of
    them, or the modules load uninstrumented and the fuzzers mutate without coverage."""
    env = {**os.environ, "GATEWAY_PURE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _FUZZ_PROBE], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["AtherisSourceFileLoader", "AtherisSourceFileLoader"]


def test_no_compiled_function_binds_one_except_name_to_two_types() -> None:
    """mypyc gives a name one type per function: a second ``except B as e`` after ``except A as e``
    makes B's handler fail with TypeError (a framing error then killed the connection instead of
    answering 400). Each compiled function binds an except name to one exception type only."""
    package = Path(native.__file__).parent
    found = []
    for name in native.COMPILED:
        source = package.joinpath(*name.split(".")[1:]).with_suffix(".py")
        for fn in ast.walk(ast.parse(source.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            types: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                    types.setdefault(node.name, set()).add(ast.unparse(node.type))
            # (httptools' exception classes are untyped: a name bound only to them holds any of them)
            found += [
                f"{source.name}:{fn.lineno} {fn.name}: {n} is {sorted(t)}"
                for n, t in types.items()
                if len(t) > 1 and not all(x.startswith("httptools.") for x in t)
            ]
    assert found == []
