"""List product functions longer than a limit (code lines: no blank, comment or docstring lines).

    python scripts/long_functions.py            # limit 60; exits 1 when any is longer
    python scripts/long_functions.py --limit 50

Product code is every package the wheel ships (``pyproject.toml``'s ``packages.find``); tests
and scripts are left out. ``tests/test_code_shape.py`` runs it.
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "core", "imaging", "inference", "medfed_cli", "models", "privacy", "server",
            "simulations", "strategies")
LIMIT = 60


def code_lines(source: str, node: ast.AST) -> int:
    """Lines of ``node`` that hold code: not blank, not only a comment, not its docstring."""
    body = getattr(node, "body", [])
    doc = (body[0].lineno, body[0].end_lineno) if body and isinstance(body[0], ast.Expr) \
        and isinstance(getattr(body[0], "value", None), ast.Constant) \
        and isinstance(body[0].value.value, str) else (0, -1)
    code: set[int] = set()
    lines = source.splitlines(keepends=True)[node.lineno - 1:node.end_lineno]
    tokens = tokenize.generate_tokens(io.StringIO("".join(lines)).readline)
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    try:
        for token in tokens:
            if token.type in skip:
                continue
            for row in range(token.start[0], token.end[0] + 1):
                line = row + node.lineno - 1
                if not doc[0] <= line <= doc[1]:
                    code.add(line)
    except (tokenize.TokenError, IndentationError):  # a nested def's lines out of context
        pass
    return len(code)


def long_functions(root: Path = ROOT, limit: int = LIMIT) -> list[tuple[str, int]]:
    """``("path:line name", code lines)`` for each function over ``limit``, longest first."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = path.read_text()
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = code_lines(source, node)
                    if n > limit:
                        found.append((f"{path.relative_to(root)}:{node.lineno} {node.name}", n))
    return sorted(found, key=lambda item: -item[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=LIMIT, help="most code lines allowed")
    args = parser.parse_args(argv)
    found = long_functions(limit=args.limit)
    for where, n in found:
        print(f"{n:4d}  {where}")
    print(f"{len(found)} functions over {args.limit} code lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
