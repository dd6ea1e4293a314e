"""Model loading: caches first, then downloads from a loopback Hugging Face
Hub through the real hf_transfer and huggingface_hub, and the fallback chain
on the real worker."""

from __future__ import annotations

import hashlib
import os

import pytest

from encrypted_vllm.worker import models as utils
from encrypted_vllm.worker.models import ModelError, ModelRef, ModelSources
from tests.jobs import GREEDY
from tests.local_hub import hub_layout

REPO = "Org/Tiny-Model"


@pytest.fixture
def sources(tmp_path, hub):
    def make(**overrides) -> ModelSources:
        settings = {
            "CACHED_MODELS_DIR": str(tmp_path / "volume"),
            "BAKED_MODELS_DIR": str(tmp_path / "baked"),
            "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
            "HF_ENDPOINT": hub.url,
            "HF_HUB_ENABLE_HF_TRANSFER": "1",
            **overrides,
        }
        return ModelSources.from_env(settings)

    return make


@pytest.fixture(scope="module")
def published(hub, tiny_model_files):
    """The tiny model on the loopback Hub, beside files vLLM never reads."""
    extras = {
        "consolidated.pth": b"pth",
        "model.onnx": b"onnx",
        "model.gguf": b"gguf",
        "logo.png": b"png",
        "pytorch_model.bin": b"bin weights, shadowed by the safetensors",
        "README.md": b"# readme",
    }
    commit = hub.add(REPO, {**tiny_model_files, **extras})
    return commit, tiny_model_files


@pytest.fixture(autouse=True)
def fresh_request_log(hub):
    hub.forget_requests()


def test_models_lists_refs_with_revisions(tmp_path):
    refs = utils.parse_models(f" org/a@v1.0 , {tmp_path}, org/b ,")
    assert refs == (ModelRef("org/a", "v1.0"), ModelRef(str(tmp_path)), ModelRef("org/b"))


def test_a_cache_hit_makes_no_request_at_all(sources, tiny_model_files, hub):
    settings = sources()
    snapshot = hub_layout(settings.cached_models_dir, "models--Org--Tiny-Model", tiny_model_files)

    assert utils.resolve(ModelRef(REPO), settings) == snapshot
    assert hub.requests() == []


def test_the_volume_may_hold_the_repo_under_another_letter_case(sources, tiny_model_files):
    settings = sources()
    snapshot = hub_layout(settings.cached_models_dir, "models--org--tiny-model", tiny_model_files)
    assert utils.resolve(ModelRef(REPO), settings) == snapshot


def test_caches_are_searched_volume_then_baked_then_hub_cache(sources, tiny_model_files):
    settings = sources()
    in_hub_cache = hub_layout(settings.hub_cache, "models--Org--Tiny-Model", tiny_model_files)
    assert utils.resolve(ModelRef(REPO), settings) == in_hub_cache
    baked = hub_layout(settings.baked_models_dir, "models--Org--Tiny-Model", tiny_model_files)
    assert utils.resolve(ModelRef(REPO), settings) == baked
    volume = hub_layout(settings.cached_models_dir, "models--Org--Tiny-Model", tiny_model_files)
    assert utils.resolve(ModelRef(REPO), settings) == volume


def test_refs_main_naming_a_missing_snapshot_falls_back_to_the_newest_complete(
    sources, tiny_model_files
):
    settings = sources()
    cache = settings.cached_models_dir
    older = hub_layout(cache, "models--Org--Tiny-Model", tiny_model_files, commit="1" * 40)
    newer = hub_layout(cache, "models--Org--Tiny-Model", tiny_model_files, commit="2" * 40)
    os.utime(older, (1, 1))
    (cache / "models--Org--Tiny-Model" / "refs" / "main").write_text("f" * 40)

    assert utils.resolve(ModelRef(REPO), settings) == newer


def test_incomplete_snapshots_are_never_used(sources, tiny_model_files, hub, published):
    settings = sources()
    cache = settings.cached_models_dir
    no_weights = {k: v for k, v in tiny_model_files.items() if not k.endswith(".safetensors")}
    hub_layout(cache, "models--Org--Tiny-Model", no_weights, commit="1" * 40)
    index = b'{"weight_map": {"a": "model-00001-of-00002.safetensors"}}'
    shard_missing = {**tiny_model_files, "model.safetensors.index.json": index}
    hub_layout(cache, "models--Org--Tiny-Model", shard_missing, commit="2" * 40)

    snapshot = utils.resolve(ModelRef(REPO), settings)

    assert snapshot.parent.parent.parent == settings.hub_cache  # downloaded instead
    assert utils.is_complete(snapshot)


def test_a_revision_asked_for_is_never_served_by_another(sources, tiny_model_files, published):
    commit, _ = published
    settings = sources()
    hub_layout(settings.cached_models_dir, "models--Org--Tiny-Model", tiny_model_files)

    snapshot = utils.resolve(ModelRef(REPO, commit), settings)

    assert snapshot.name == commit
    assert snapshot.parent.parent.parent == settings.hub_cache


@pytest.mark.parametrize("hf_transfer", ["1", "0"], ids=["hf_transfer", "huggingface_hub"])
def test_a_download_lands_in_the_hub_cache_and_the_next_start_hits_it(
    hf_transfer, sources, hub, published
):
    commit, files = published
    settings = sources(HF_HUB_ENABLE_HF_TRANSFER=hf_transfer)

    snapshot = utils.resolve(ModelRef(REPO), settings)

    assert snapshot == settings.hub_cache / "models--Org--Tiny-Model" / "snapshots" / commit
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(files)  # nothing vLLM skips
    for name, data in files.items():
        assert (snapshot / name).is_symlink() and (snapshot / name).read_bytes() == data
    weights = (snapshot / "model.safetensors").resolve()
    assert weights.name == hashlib.sha256(files["model.safetensors"]).hexdigest()
    refs = settings.hub_cache / "models--Org--Tiny-Model" / "refs" / "main"
    assert refs.read_text() == commit
    resolve_calls = [path for method, path in hub.requests() if "/resolve/" in path]
    assert resolve_calls and all("pth" not in p and "onnx" not in p for p in resolve_calls)

    hub.forget_requests()
    assert utils.resolve(ModelRef(REPO), settings) == snapshot
    assert hub.requests() == []


def test_bin_weights_are_fetched_only_where_there_are_no_safetensors():
    files = [
        utils.RemoteFile(name, 1, name)
        for name in ("config.json", "pytorch_model.bin", "tokenizer.json", "model.onnx")
    ]
    chosen = [f.path for f in utils.select_files(files)]
    assert chosen == ["config.json", "tokenizer.json", "pytorch_model.bin"]
    with_safetensors = [*files, utils.RemoteFile("model.safetensors", 1, "s")]
    assert "pytorch_model.bin" not in [f.path for f in utils.select_files(with_safetensors)]


def test_an_unknown_repo_is_named_with_what_to_do(sources, hub):
    settings = sources()
    with pytest.raises(ModelError) as caught:
        utils.resolve(ModelRef("Org/No-Such-Model"), settings)
    message = str(caught.value)
    assert message.startswith("Org/No-Such-Model: no such model") and "check MODELS" in message
    assert "\n" not in message


def test_a_gated_repo_needs_an_accepted_token(sources, hub, tiny_model_files):
    hub.add("Org/Gated", tiny_model_files, tokens=["hf_accepted"])

    with pytest.raises(ModelError, match="gated: set HF_TOKEN"):
        utils.resolve(ModelRef("Org/Gated"), sources())
    with pytest.raises(ModelError, match="HF_TOKEN was refused"):
        utils.resolve(ModelRef("Org/Gated"), sources(HF_TOKEN="hf_other"))
    assert utils.is_complete(utils.resolve(ModelRef("Org/Gated"), sources(HF_TOKEN="hf_accepted")))


def test_offline_with_nothing_cached_says_so(sources, hub):
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=1 and no cache"):
        utils.resolve(ModelRef(REPO), sources(HF_HUB_OFFLINE="1"))
    assert hub.requests() == []


def test_too_little_disk_is_refused_before_downloading(tmp_path):
    free = utils.shutil.disk_usage(tmp_path).free
    too_big = [utils.RemoteFile("model.safetensors", free * 2, "x")]
    with pytest.raises(ModelError, match="free: give the worker a larger disk"):
        utils._check_disk_space(ModelRef(REPO), too_big, tmp_path)


@pytest.mark.parametrize("hf_transfer", ["1", "0"], ids=["hf_transfer", "huggingface_hub"])
def test_a_connection_dropped_mid_file_leaves_no_corrupt_cache_and_a_retry_succeeds(
    hf_transfer, sources, hub, tiny_model_files, tmp_path
):
    weights = os.urandom(3_000_000)
    files = {**tiny_model_files, "model.safetensors": weights}
    hub.add("Org/Flaky", files)
    settings = sources(HF_HUB_ENABLE_HF_TRANSFER=hf_transfer)
    hub.break_connection("model.safetensors", after_bytes=1_000_000, times=100)

    with pytest.raises(ModelError):
        utils.resolve(ModelRef("Org/Flaky"), settings)
    assert utils.find_snapshot(settings.hub_cache, ModelRef("Org/Flaky")) is None
    blobs = settings.hub_cache / "models--Org--Flaky" / "blobs"
    assert hashlib.sha256(weights).hexdigest() not in os.listdir(blobs)

    hub.break_connection("model.safetensors", after_bytes=1_000_000, times=0)
    snapshot = utils.resolve(ModelRef("Org/Flaky"), settings)
    assert (snapshot / "model.safetensors").read_bytes() == weights


def test_hf_transfer_retries_a_dropped_chunk_by_itself(sources, hub, tiny_model_files):
    weights = os.urandom(3_000_000)
    hub.add("Org/Hiccup", {**tiny_model_files, "model.safetensors": weights})
    hub.break_connection("model.safetensors", after_bytes=1_000_000, times=1)

    snapshot = utils.resolve(ModelRef("Org/Hiccup"), sources())

    assert (snapshot / "model.safetensors").read_bytes() == weights


async def test_the_worker_falls_back_to_the_next_model_and_serves_it(live, engine, hf_tokenizer):
    """The live worker's MODELS is `Org/No-Such-Model,Org/Tiny-Model`: the
    first is not on the Hub; the second is in the cached-model volume under a
    lowercased folder name. The worker says why it skipped the first, then
    serves the second."""
    from tests.jobs import greedy_text

    log = live.worker_log()
    assert "Org/No-Such-Model: no such model" in log
    assert "Org/Tiny-Model: found in RunPod's cached-model volume" in log
    with live.client() as endpoint:
        completion = endpoint.run_sync("Fallback.", sampling_params=GREEDY)
    expected = await greedy_text(engine, hf_tokenizer("Fallback.").input_ids, 24)
    assert completion.text == expected


def test_downloads_go_to_the_containers_disk_when_the_hub_cache_is_read_only(
    sources, hub, tiny_model_files
):
    hub.add("Org/Read-Only-Cache", tiny_model_files)
    settings = sources(HF_HUB_CACHE="/proc/read-only-hub-cache")  # not writable, even by root

    snapshot = utils.resolve(ModelRef("Org/Read-Only-Cache"), settings)

    fallback = utils.Path(utils.tempfile.gettempdir()) / "huggingface-hub"
    assert snapshot.is_relative_to(fallback) and utils.is_complete(snapshot)
    utils.shutil.rmtree(fallback / "models--Org--Read-Only-Cache")
