"""``make fuzz``: coverage-guided fuzzing (atheris, libFuzzer) of the framer and head analysis.

    python -m tests.fuzz TARGET SECONDS        # TARGET: requests or responses

Starts from the seed corpus (tests/fuzz/corpus/TARGET) and the inputs found before
(tests/fuzz/regressions/TARGET); new interesting inputs go to a temporary directory. A crash, a
broken property or an input taking over 100 ms of CPU is a failure: the input is printed (repr)
and written to tests/fuzz/found/; copy it to tests/fuzz/regressions/TARGET so the test suite
replays it for ever (tests/unit/test_fuzz_regressions.py).
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["gateway", "tests.framing_driver", "tests.fuzz"]):
    from tests.fuzz import targets

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: python -m tests.fuzz {{{','.join(targets.TARGETS)}}} SECONDS")
    target, seconds = sys.argv[1], int(float(sys.argv[2]))
    found = os.path.join(HERE, "found")
    os.makedirs(found, exist_ok=True)

    def one(data: bytes) -> None:
        try:
            targets.check(target, data, targets.LIMIT)
        except BaseException:
            print(f"\nfuzz {target}: failing input (replay: tests/fuzz/regressions/{target}/):\n{data!r}\n", flush=True)
            raise

    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as work:
        dirs = [work] + [d for d in (os.path.join(HERE, "corpus", target), os.path.join(HERE, "regressions", target))
                         if os.path.isdir(d)]  # fmt: skip
        args = [sys.argv[0], f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=4096", "-max_len=4096",
                f"-artifact_prefix={found}/{target}-", "-print_final_stats=1", *dirs]  # fmt: skip
        atheris.Setup(args, one)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
