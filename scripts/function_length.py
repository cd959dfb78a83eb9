"""Lint rule: no function or method in the project's code is longer than 80 lines.

Counts from the ``def`` line (decorators excluded) to the function's last line, so a long
docstring counts too: split the function, or move what it documents where it belongs.
Run by ``make lint``; exits 1 listing every function over the limit.

    python scripts/function_length.py [--max N] [paths ...]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

MAX_LINES = 80
#: The code of the project (tests are not product code).
PATHS = (
    "nec_serve",
    "models",
    "export",
    "wrapper",
    "controller",
    "cli",
    "dev",
    "benchmarks",
    "scripts",
)


def long_functions(source: str, name: str, limit: int = MAX_LINES) -> Iterator[str]:
    """``file:line name (N lines)`` for each function of ``source`` over ``limit`` lines."""
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                yield f"{name}:{node.lineno} {node.name} ({lines} lines > {limit})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", default=PATHS)
    p.add_argument("--max", type=int, default=MAX_LINES)
    args = p.parse_args(argv)
    found = [
        hit
        for root in args.paths
        for path in sorted(Path(root).rglob("*.py") if Path(root).is_dir() else [Path(root)])
        for hit in long_functions(path.read_text(), str(path), args.max)
    ]
    for hit in found:
        print(hit)
    if found:
        print(f"{len(found)} function(s) over {args.max} lines: split them", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
