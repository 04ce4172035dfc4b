"""Check the shape rule of docs/architecture.md: no function over 60 lines or of cyclomatic complexity over 15
(radon's measure) in remote_exec, unless a ``# shape: <reason>`` comment on its ``def`` line or the line just
above states why. Prints each offender; exits 1 when there is one.

    python scripts/code_shape.py [--max-lines 60] [--max-complexity 15]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from radon.complexity import cc_visit

ROOT = Path(__file__).resolve().parents[1] / "remote_exec"


def _excused(lines: list[str], lineno: int) -> bool:
    """A ``# shape:`` comment on the def line (or its decorator block) or the line above it."""
    window = lines[max(0, lineno - 2):lineno]
    return any("# shape:" in line for line in window)


def offenders(max_lines: int, max_complexity: int) -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        complexity = {(block.lineno, block.name): block.complexity
                      for block in cc_visit(source) for block in [block, *getattr(block, "methods", [])]}
        for node in ast.walk(ast.parse(source, str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            score = complexity.get((node.lineno, node.name), 0)
            if (length > max_lines or score > max_complexity) and not _excused(lines, node.lineno):
                where = path.relative_to(ROOT.parent)
                found.append(f"{where}:{node.lineno} {node.name}: {length} lines, complexity {score}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-lines", type=int, default=60)
    parser.add_argument("--max-complexity", type=int, default=15)
    args = parser.parse_args()
    found = offenders(args.max_lines, args.max_complexity)
    for line in found:
        print(line)
    print(f"code shape: {len(found)} function(s) over {args.max_lines} lines or complexity {args.max_complexity}"
          " without a stated reason", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
