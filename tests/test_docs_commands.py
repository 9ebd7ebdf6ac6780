"""Every command line the README and docs/ show goes through the real argument parsers.

Commands are taken from the shell code blocks of README.md and every page under docs/
(``medfed ...``, ``python -m <module> ...``, ``bash scripts/...``) and from inline code that
starts with ``medfed`` or ``python -m simulations.``. Each is parsed by the parser that would
run it (nothing runs: parsing stops at the parsed arguments); a flag, subcommand or choice the
code no longer has fails the test, naming the page and line. Inline code may leave out
required arguments (it names a command in prose), so only those are forgiven there.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*```(\w*)\s*$")
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
STARTS = ("medfed ", "python -m ", "python3 -m ", "bash scripts/")
INLINE = re.compile(r"`((?:medfed|python -m simulations\.[a-z_.]+) [^`]*)`")
MODULE_MAINS = {"simulations.bench": "simulations.bench.__main__"}
"""``python -m X`` runs ``X``'s ``__main__`` module for a package."""


def shown_commands(page: Path) -> list[tuple[int, str, bool]]:
    """(line number, command, inline) for each command shown on ``page``."""
    found, in_block, lang, pending, start = [], False, "", "", 0
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if fence := FENCE.match(line):
            in_block, lang = not in_block, fence.group(1)
            continue
        if not in_block:
            found += [(number, span, True) for span in INLINE.findall(line)]
            continue
        text = line.strip().removeprefix("$ ")
        if lang not in SHELL_BLOCKS or not (pending or text.startswith(STARTS)):
            continue
        pending, start = (f"{pending} {text}" if pending else text), start if pending else number
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        found.append((start, pending, False))
        pending = ""
    return found


class Parsed(Exception):
    """Raised in place of running a command once its arguments are parsed."""


class Refused(Exception):
    """The parser refused the command (the argparse message)."""


def parse_only(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``argv``'s entry point until its parser has parsed it (raises :class:`Parsed`) or
    refused it (raises :class:`Refused`)."""
    full, known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    inside = []  # a parse under way: parsers' own nested calls pass through

    def parse_args(self, args=None, namespace=None):
        inside.append(True)
        raise Parsed(full(self, args, namespace))

    def parse_known_args(self, args=None, namespace=None):
        if inside:
            return known(self, args, namespace)
        inside.append(True)  # an entry point that parses only what it knows
        raise Parsed(known(self, args, namespace))

    def error(self, message):
        raise Refused(message)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    monkeypatch.setattr(argparse.ArgumentParser, "error", error)
    if argv[0] == "medfed":
        from medfed_cli.main import main

        main(argv[1:])
    elif argv[0] in ("python", "python3") and argv[1] == "-m":
        module = MODULE_MAINS.get(argv[2], argv[2])
        if module == "pytest":
            missing = [a for a in argv[3:] if a.startswith("tests/")
                       and not (ROOT / a.split("::")[0]).exists()]
            if missing:
                raise Refused(f"no such test file: {missing}")
            raise Parsed(argv)
        importlib.import_module(module).main(argv[3:])
    elif argv[0] == "bash":
        if not (ROOT / argv[1]).is_file():
            raise Refused(f"no script {argv[1]}")
        raise Parsed(argv)
    raise AssertionError("the command ran past its parser")


CASES = [(page, number, command, inline) for page in PAGES
         for number, command, inline in shown_commands(page)]


def test_the_docs_show_commands():
    assert len(CASES) > 50
    assert sum(1 for *_, inline in CASES if not inline) > 40


@pytest.mark.parametrize(("page", "number", "command", "inline"), CASES,
                         ids=[f"{c[0].relative_to(ROOT)}:{c[1]}" for c in CASES])
def test_a_shown_command_parses(page, number, command, inline, monkeypatch, capsys):
    argv = shlex.split(command, comments=True)
    try:
        parse_only(argv, monkeypatch)
    except Parsed:
        return
    except SystemExit as done:  # --help printed and exited
        assert done.code == 0, f"{page.name}:{number}: {command}"
    except Refused as refused:
        message = str(refused)
        if inline and "arguments are required" in message:
            return
        pytest.fail(f"{page.relative_to(ROOT)}:{number}: `{command}` is refused: {message}")
