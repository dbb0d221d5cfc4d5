"""Every input the fuzzer was seeded with or ever found, replayed (issue 9, point 5).

``make fuzz`` (tests/fuzz/) writes a failing input to tests/fuzz/found/; once fixed, it is copied
to tests/fuzz/regressions/<target>/ and checked here for ever, with the same properties the
fuzzer checks (tests/fuzz/targets.py), without the fuzzer's CPU limit but with a bound that turns
a framer that never returns into a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import framing_driver as drive
from tests.fuzz import targets

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
INPUTS = sorted(
    (target, path)
    for kind in ("corpus", "regressions")
    for target in targets.TARGETS
    for path in (FUZZ / kind / target).glob("*")
    if path.is_file()
)


def test_there_are_seeds_for_both_directions() -> None:
    assert {t for t, _ in INPUTS} == set(targets.TARGETS)


@pytest.mark.parametrize(("target", "path"), INPUTS, ids=[f"{t}/{p.parent.parent.name}/{p.name}" for t, p in INPUTS])
def test_input(target: str, path: Path) -> None:
    with drive.bounded():
        targets.check(target, path.read_bytes())
