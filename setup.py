"""The build: pyproject.toml holds the metadata; this file only decides whether the data plane is
compiled (gateway/native.py says why and which modules).

Compiled when mypyc can be imported (it comes with mypy: ``make install`` builds inside the venv,
``pip install --no-build-isolation``), a C compiler and Python's headers are there, and
``GATEWAY_COMPILE`` is not ``0``. Otherwise, as in pip's isolated build, the wheel is pure Python.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
NATIVE = runpy.run_path(str(HERE / "gateway" / "native.py"))  # (not imported: the package needs its dependencies)


def compiler() -> str | None:
    """Why the data plane cannot be compiled here, or None."""
    if os.environ.get("GATEWAY_COMPILE", "1") == "0":
        return "GATEWAY_COMPILE=0"
    if importlib.util.find_spec("mypyc") is None:
        return "no mypyc in the build environment (make install builds with it)"
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(cc.split()[0]) is None:
        return f"no C compiler ({cc.split()[0]}; Debian: apt-get install gcc)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python.h (Debian: apt-get install python3-dev)"
    return None


class BuildExt(build_ext):  # type: ignore[misc]
    """Also writes the SHA-256 of every source of the package (gateway/native.py: a stale build is
    found), beside the modules it built."""

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        base = HERE if self.inplace else Path(self.build_lib)
        sums = NATIVE["source_sums"](HERE / "gateway")
        (base / "gateway" / "_native.sha256").write_text("".join(f"{p} {h}\n" for p, h in sums.items()))


def ext_modules() -> list[Any]:
    if {"egg_info", "dist_info"} & set(sys.argv[1:]):  # (pip asks for metadata first: no compiling)
        return []
    why = compiler()
    if why is not None:
        print(f"gateway: building pure Python ({why})", file=sys.stderr)
        return []
    from mypyc.build import mypycify  # noqa: PLC0415  (only where it can be imported)

    files = [name.replace(".", "/") + ".py" for name in NATIVE["COMPILED"]]
    print(f"gateway: compiling {len(files)} modules with mypyc", file=sys.stderr)
    # The runtime's C files are copied to build/ and compiled there (not #included from mypyc's
    # own directory), so that the one below can be corrected first.
    exts = mypycify(files, opt_level="3", debug_level="1", group_name="gateway._native", include_runtime_files=False)
    _correct_bytes_slices(Path("build") / "bytes_ops.c")
    return exts


def _correct_bytes_slices(path: Path) -> None:
    """mypyc's ``bytes[i:j]`` (CPyBytes_GetSlice, mypy 2.4.1) asks for a bytes object of ``j - i``
    bytes after clamping both to the length; when ``j < i`` that is negative, and instead of Python's
    ``b""`` the slice raises SystemError (found by the fuzz regressions: a response head shorter
    than its status line's slice). Corrected here to Python's result: empty."""
    text = path.read_text()
    bug = "Py_ssize_t slice_len = endn - startn;"
    fixed = "Py_ssize_t slice_len = endn > startn ? endn - startn : 0;  /* gateway: setup.py */"
    if fixed in text:
        return
    if text.count(bug) != 1:
        raise SystemExit(f"setup.py: {path} changed (mypyc upgrade?): check CPyBytes_GetSlice by hand")
    path.write_text(text.replace(bug, fixed))


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExt})
