"""Global options (``--config/-c``, ``--tcti``, ``--json``, ``-v``) before or after any command.

The parser of every command, at every depth, is walked: each must accept the
global options after itself with the same meaning as before the command.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tpmid._cli import subparsers_of
from tpmid.cli import build_parser, main, parse_args

PARSER = build_parser()


def commands(parser: argparse.ArgumentParser,
             path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command: ``(("est-server", "run"), parser)``."""
    subs = list(subparsers_of(parser))
    if not subs:
        yield path, parser
    for name, sp in subs:
        yield from commands(sp, (*path, name))


def required_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for a command's required positionals and options."""
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        value = str(next(iter(action.choices))) if action.choices else "1"
        if not action.option_strings and action.nargs not in ("?", "*"):
            out.append(value)
        elif action.option_strings and action.required:
            out += [action.option_strings[0], value]
    return out


COMMANDS = dict(commands(PARSER))
GLOBALS = ["-c", "dev1.yaml", "--tcti", "swtpm:host=127.0.0.1,port=2321", "--json", "-v"]


def test_the_walk_finds_every_command_group() -> None:
    groups = {path[0] for path in COMMANDS}
    assert {"tpm", "key", "csr", "est", "enroll", "renew", "daemon", "status", "check",
            "reset", "provision", "est-server"} <= groups
    assert ("est-server", "run") in COMMANDS and ("est-server", "label") in COMMANDS


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_mean_the_same_before_and_after_the_command(
        path: tuple[str, ...], where: str) -> None:
    args = [*path, *required_arguments(COMMANDS[path])]
    argv = [*GLOBALS, *args] if where == "before" else [*args, *GLOBALS]
    ns = parse_args(argv, PARSER)
    assert (ns.config, ns.tcti, ns.json, ns.verbose) == (
        "dev1.yaml", "swtpm:host=127.0.0.1,port=2321", True, 1)
    assert callable(ns.func)


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_verbosity_adds_up_across_levels_and_the_last_config_wins(path: tuple[str, ...]) -> None:
    argv = ["-v", "-c", "first.yaml", *path[:1], "-v", *path[1:],
            *required_arguments(COMMANDS[path]), "-v", "-c", "last.yaml"]
    ns = parse_args(argv, PARSER)
    assert ns.verbose == 3
    assert ns.config == "last.yaml"
    assert ns.json is False and ns.tcti is None


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_help_lists_the_global_options(path: tuple[str, ...]) -> None:
    text = COMMANDS[path].format_help()
    assert "global options (before or after the command)" in text
    for option in ("--config PATH, -c PATH", "--tcti TCTI", "--json", "-v, --verbose"):
        assert option in text, f"{' '.join(path)}: {option} missing from its help"


def test_status_reads_the_config_given_after_the_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "dev1.yaml"
    config.write_text(yaml.safe_dump({
        "store": {"dir": str(tmp_path / "store")},
        "identities": {"ldevid": {"key": {"kind": "file", "alg": "ecc-p256"},
                                  "subject": {"cn": "dev1"}}},
    }))
    config.chmod(0o600)
    assert main(["status", "-c", str(config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "ldevid" in json.dumps(data)


def test_provision_with_the_config_after_the_command_reads_that_file(tmp_path: Path) -> None:
    # Before: "unrecognized arguments: -c"; now the file itself is what is wrong.
    missing = tmp_path / "dev1.yaml"
    proc = subprocess.run([sys.executable, "-m", "tpmid.cli", "provision", "-c", str(missing)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "unrecognized arguments" not in proc.stderr
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


def test_est_server_run_takes_json_after_itself(tmp_path: Path) -> None:
    from tpmid.server import init_server_dir
    from tpmid.testing.estserver import tpmid_command

    res = init_server_dir(tmp_path / "srv")
    out = tmp_path / "run.json.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(tpmid_command("est-server", "run", "--dir", str(res.dir),
                                              "--port", "0", "--json"),
                                stdout=f, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                data = json.loads(out.read_text())
                break
            except ValueError:
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert data["listening"] == f"https://127.0.0.1:{data['port']}/"
    assert set(data["urls"]) == {"idevid", "ldevid", "edgeca"}


def test_the_command_table_matches_what_the_command_modules_register() -> None:
    """`tpmid --help` lists commands from COMMANDS without importing their modules."""
    import importlib

    from tpmid._cli import COMMANDS
    for name, (module, help_text) in COMMANDS.items():
        p = argparse.ArgumentParser()
        sub = p.add_subparsers()
        importlib.import_module(f"tpmid._cli.{module}").register(sub)
        assert name in sub.choices, f"{module} does not register {name}"
        shown = {a.dest: a.help for a in sub._choices_actions}
        assert shown[name] == help_text
    assert {name for name, _ in subparsers_of(build_parser())} == set(COMMANDS)


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["-c", "x.yaml", "renew",
                                                                      "--help"]])
def test_help_is_the_same_whether_one_group_or_all_are_built(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from tpmid._cli import command_in

    outputs = []
    for parser in (build_parser(), build_parser(command_in(argv))):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert "usage: tpmid" in outputs[0]


def test_help_imports_no_command_module() -> None:
    code = ("import sys; from tpmid.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('tpmid._cli.', 'tpmid.tpm',"
            " 'tpm2_pytss', 'cryptography', 'requests'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == "['tpmid._cli.context']"
