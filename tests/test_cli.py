"""The `k2` command: exit codes, help text and `k2 version`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import k2
from k2.cli import build_parser, main


def run_k2(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "k2", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_command_and_exits_zero() -> None:
    result = run_k2("--help")
    assert result.returncode == 0
    assert "Kimi K2" in result.stdout
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    for name in subparsers.choices:
        assert name in result.stdout


def test_every_subcommand_has_help() -> None:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    for name in subparsers.choices:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0


def test_no_command_is_a_usage_error() -> None:
    result = run_k2()
    assert result.returncode == 2
    assert "COMMAND" in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = run_k2("no-such-command")
    assert result.returncode == 2
    assert "no-such-command" in result.stderr


def test_version_json_names_k2_torch_and_native() -> None:
    result = run_k2("version", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["k2"] == k2.__version__
    assert info["k2._native"] == k2.__version__
    assert info["torch"] == torch.__version__


def test_console_script_is_installed() -> None:
    import shutil

    # pip puts console scripts beside the interpreter it installs for (the venv's bin/), which
    # is on PATH only in an activated environment.
    exe = shutil.which("k2", path=os.path.dirname(sys.executable))
    assert exe is not None, f"no `k2` console script beside {sys.executable}; reinstall k2"
    result = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert k2.__version__ in result.stdout


def test_k2_error_exits_one_with_the_message(capsys, monkeypatch) -> None:
    from k2.commands import version

    def broken(args):
        raise k2.ConfigError("field 'hidden_size' must be positive, got -1")

    # register() looks `run` up when the parser is built, so the patch takes effect.
    monkeypatch.setattr(version, "run", broken)
    assert main(["version"]) == 1
    assert "k2 version: error: field 'hidden_size'" in capsys.readouterr().err
