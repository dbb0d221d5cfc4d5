"""Which of the gateway's modules run compiled, and whether the build is older than the sources.

The data plane's modules (:data:`COMPILED`: everything a request's bytes go through, from the
host grammar to the HTTP/2 streams) are compiled to C extension modules with mypyc when the build
has it (``make install`` does; setup.py): the same source, type-checked by ``mypy --strict`` as it
is, runs as native code, and the interpreter's per-call and per-attribute work, most of what the
gateway's own code cost per request, goes (docs/development.md, "Compiling the data plane with
mypyc"). The pure Python modules stay the reference: a build without a C compiler runs them,
slower, with the same behaviour.

An extension module shadows the ``.py`` beside it, so a source edited after the build would not be
what runs; and compiled code also relies on what it inferred from the modules it imports (a
setting's type, a class's attributes). The build writes the SHA-256 of every source of the package
to :data:`SUMS`; :func:`status` compares, the test suite refuses to run on a stale build, and
``gateway serve`` says which build it runs.

``GATEWAY_PURE=1`` runs the sources whatever was built (:func:`prefer_source`, installed by the
package before it imports any of them): the fuzzers need it, since atheris instruments bytecode.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["COMPILED", "SUMS", "Status", "prefer_source", "source_sums", "status"]

#: The modules mypyc compiles, in one group (calls between them are native calls). Not here:
#: http/h2conn.py (its ServerConnection subclasses h2's Python class: compiled, as a class mypyc
#: leaves to the interpreter, it gained 0.5 %), http/client.py and http/hdrs.py (names and
#: constants), http/tls_accept.py (once per connection), and the control plane (configuration,
#: catalog, admin app, supervisor, metrics: not per request).
COMPILED: Final = (
    "gateway.hostname",
    "gateway.policy",
    "gateway.http.admission",
    "gateway.http.context",
    "gateway.http.downstream",
    "gateway.http.flow",
    "gateway.http.framing",
    "gateway.http.h2map",
    "gateway.http.h2tunnel",
    "gateway.http.headers",
    "gateway.http.http2",
    "gateway.http.proxy",
    "gateway.http.proxy_protocol",
    "gateway.http.resume",
    "gateway.http.tunnel",
    "gateway.http.upstream",
    "gateway.http.wsframes",
)

#: Written by the build next to this module: ``<path in the package> <sha256>`` per source.
SUMS: Final = Path(__file__).with_name("_native.sha256")


@dataclass(frozen=True)
class Status:
    compiled: tuple[str, ...]  # modules that import as extension modules
    stale: tuple[str, ...]  # sources (paths in the package) added, removed or changed since the build


def source_sums(package: Path) -> dict[str, str]:
    """``{path in the package: sha256}`` of every ``.py`` of the package in ``package``."""
    return {
        p.relative_to(package).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(package.rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def status(sums: Path = SUMS) -> Status:
    """Which modules of :data:`COMPILED` import as extension modules, and which sources changed since.

    Read from the files beside each source (the import system takes an extension module before the
    ``.py`` of the same name), not from imported modules: a compiled module's ``__spec__`` need not
    name the file it came from."""
    if any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        return Status((), ())
    package = Path(__file__).parent
    compiled = tuple(
        name
        for name in COMPILED
        if any(
            package.joinpath(*name.split(".")[1:]).with_suffix(suffix).exists()
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
        )
    )
    if not compiled:
        return Status((), ())
    try:
        built = dict(line.split() for line in sums.read_text().splitlines() if line.strip())
    except OSError:
        built = {}
    now = source_sums(package)
    return Status(compiled, tuple(sorted(p for p in built.keys() | now.keys() if built.get(p) != now.get(p))))


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the ``.py`` of a module in :data:`COMPILED` before the import system finds its build."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED or path is None:  # (each is a submodule: found in its package's path)
            return None
        for entry in path:
            source = Path(entry) / (fullname.rpartition(".")[2] + ".py")
            if source.is_file():
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def prefer_source() -> None:
    """Import the compiled modules from their sources from now on (before any of them is imported).

    The finder goes just before the one that finds files (``PathFinder``), not first: an import
    hook ahead of it, such as atheris's, asks the finders after itself and wraps their loader, which
    is how the fuzzers instrument these modules."""
    if any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        return
    at = next((i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder), len(sys.meta_path))
    sys.meta_path.insert(at, _SourceFirst())
