"""Every printed command runs as printed: `python3 client.py ...` with a
Python that lacks the packages starts again in `.venv`, and without a
`.venv` says to run `bash setup.sh` first instead of a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python with no third-party package at all."""
    where = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False).create(where)
    python = where / "bin" / "python"
    assert subprocess.run([python, "-c", "import pydantic"], capture_output=True).returncode
    return python


def test_a_script_run_with_a_bare_python_starts_again_in_the_venv(bare_python):
    result = subprocess.run(
        [bare_python, "client.py", "--generate-key"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == 44  # a Fernet key


@pytest.mark.parametrize("script", ["test_local.py", "gateway.py"])
def test_every_printed_command_starts_again_in_the_venv(bare_python, script):
    result = subprocess.run(
        [bare_python, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")


def test_without_a_venv_the_missing_package_and_the_fix_are_named(bare_python, tmp_path):
    shutil.copy(ROOT / "client.py", tmp_path / "client.py")
    shutil.copytree(ROOT / "encrypted_vllm", tmp_path / "encrypted_vllm")
    result = subprocess.run(
        [bare_python, "client.py", "--generate-key"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "is not installed here: run `bash setup.sh` first" in result.stderr


def test_the_worker_checks_its_configuration_before_importing_torch_or_vllm():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "rp_handler.py"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "MODELS is required" in result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "pydantic" in imported
    assert not {"torch", "vllm", "runpod"} & imported
