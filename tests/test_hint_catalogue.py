"""Every hint tpmid gives names commands that exist, with options they accept, and no placeholder.

The catalogue is read from the source: each ``hint=...`` given to an error and
each ``e.hint = ...`` assignment in ``tpmid/``, with the parts computed at run
time (f-string fields) standing in as ``{…}``. For each ``tpmid COMMAND
[SUBCOMMAND] [--option ...]`` a hint mentions, the command line parser must know
the command and every option. A hint must not send the operator to a literal
placeholder such as ``NAME``, ``INDEX`` or ``<identity>``: it names the identity,
or says in words what to fill in.

The situations where following a hint matters most are run end to end in
tests/operator/ and tests/faults/ (the hint's command is executed there).
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from tpmid.cli import build_parser

ROOT = Path(__file__).resolve().parents[1] / "tpmid"
PLACEHOLDERS = re.compile(r"<[a-z_ -]+>|\b(NAME|INDEX|FILE|PATH|SERIAL|LABEL|DIR|HANDLE|URL|"
                          r"VALUE|IDENTITY)\b")
COMMAND = re.compile(r"\btpmid((?: [A-Za-z][A-Za-z0-9-]*| \{…\}| --?[a-z][a-z-]*(?:[ =][^ `;,()]+)?)+)")
BACKTICKED = re.compile(r"`tpmid[^`]*`")


def _commands(hint: str) -> list[str]:
    """``tpmid ...`` command lines in ``hint``: in backticks, or starting with a real command.

    ("tpmid does not ..." is prose, not a command.)"""
    known = set(_subparsers(build_parser()))
    out = []
    for m in COMMAND.finditer(hint):
        quoted = any(b.start() <= m.start() < b.end() for b in BACKTICKED.finditer(hint))
        words = m.group(1).split()
        if quoted or (words and words[0] in known):
            out.append(m.group(1))
    return out


def _text(node: ast.AST) -> list[str]:
    """The possible texts of a string expression (f-string fields as ``{…}``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        parts = [v.value if isinstance(v, ast.Constant) else "{…}" for v in node.values]
        return ["".join(str(p) for p in parts)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [a + b for a in _text(node.left) for b in _text(node.right)]
    if isinstance(node, ast.IfExp):
        return _text(node.body) + _text(node.orelse)
    if isinstance(node, ast.BoolOp):
        return [t for v in node.values for t in _text(v)]
    return []


def _hints() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(ROOT.parent))
        for node in ast.walk(tree):
            values: list[ast.AST] = []
            if isinstance(node, ast.Call):
                values += [k.value for k in node.keywords if k.arg == "hint"]
            elif isinstance(node, ast.Assign):
                if any(isinstance(t, ast.Attribute) and t.attr == "hint" for t in node.targets):
                    values.append(node.value)
            for v in values:
                found += [(f"{where}:{node.lineno}", t) for t in _text(v)]
    return found


HINTS = _hints()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_the_catalogue_is_not_empty() -> None:
    assert len(HINTS) > 100  # the scan finds the hints (a broken scan would pass vacuously)


@pytest.mark.parametrize(("where", "hint"), HINTS, ids=[w for w, _ in HINTS])
def test_a_hint_has_no_placeholder(where: str, hint: str) -> None:
    for command in _commands(hint):
        assert not PLACEHOLDERS.search(command), f"{where}: `tpmid{command}` has a placeholder"
    assert not re.search(r"<[a-z_ -]+>", hint), f"{where}: {hint!r}"
    assert not re.search(r"--[a-z-]+ [A-Z]{2,}\b", hint), f"{where}: an option placeholder: {hint!r}"


@pytest.mark.parametrize(("where", "hint"), HINTS, ids=[w for w, _ in HINTS])
def test_every_command_a_hint_names_exists_with_its_options(where: str, hint: str) -> None:
    root = build_parser()
    global_options = _options(root)
    for command in _commands(hint):
        words = command.split()
        parser, path = root, ["tpmid"]
        for word in words:
            if word.startswith("-"):
                option = word.split("=", 1)[0]
                assert option in _options(parser) | global_options, \
                    f"{where}: `{' '.join(path)}` has no option {option} ({hint!r})"
                continue
            subs = _subparsers(parser)
            if subs and word != "{…}" and not word.isupper():
                assert word in subs, f"{where}: `{' '.join(path)}` has no command {word!r}"
                parser, path = subs[word], [*path, word]
