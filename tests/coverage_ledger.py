"""The ledger of library lines no test runs: `make coverage` prints it after both suites ran under
coverage.py (its data combined in .coverage). One line per file: how many of its statements never
ran and where; then the lines left out as `# cuda-only: WHY`, with their reasons. The short summary
of one run is docs/coverage.md.

    python tests/coverage_ledger.py [--markdown]
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parent.parent
CUDA_ONLY = re.compile(r"#\s*cuda-only:\s*(.+)$")


def ranges(lines: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out, start = [], None
    for a, b in zip(lines, [*lines[1:], None], strict=True):
        start = a if start is None else start
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else str(a))
            start = None
    return ", ".join(out)


def ledger() -> tuple[list[tuple[str, int, int, str]], list[tuple[str, int, str]], int]:
    """(per file with misses: name, statements, missed, where), (cuda-only: file, line, why),
    the statements of every measured file."""
    cov = coverage.Coverage(data_file=str(ROOT / ".coverage"))
    cov.load()
    files, reasons, total = [], [], 0
    layers = cov.config.source or []
    for path in sorted(str(p) for layer in layers for p in (ROOT / layer).rglob("*.py")):
        name = str(Path(path).resolve().relative_to(ROOT))
        _, statements, _, missing, _ = cov.analysis2(path)
        total += len(statements)
        if missing:
            files.append((name, len(statements), len(missing), ranges(missing)))
        for number, text in enumerate(Path(path).read_text().splitlines(), 1):
            if m := CUDA_ONLY.search(text):
                reasons.append((name, number, m.group(1).strip()))
    return files, reasons, total


def main() -> None:
    files, reasons, total = ledger()
    missed = sum(f[2] for f in files)
    if "--markdown" in sys.argv:
        print("| file | lines never run | where |\n|---|---:|---|")
        for name, _, n, where in sorted(files, key=lambda f: -f[2]):
            print(f"| `{name}` | {n} | {where} |")
    else:
        for name, _, n, where in sorted(files, key=lambda f: -f[2]):
            print(f"{name}: {n} never run: {where}")
    print(
        f"\n{missed} library lines never run by a test, in {len(files)} files, of {total} statements"
    )
    counts = Counter(why for _, _, why in reasons)
    print(f"{len(reasons)} places left out as CUDA-only:")
    for why, n in counts.most_common():
        print(f"  {n} x {why}")


if __name__ == "__main__":
    main()
