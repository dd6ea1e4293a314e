"""Session fixtures: the tiny model, a key, and one real vLLM engine.

The engine starts once per session (about half a minute on two cores) and
every in-process test shares it, as jobs share it in production.
"""

from __future__ import annotations

import collections
import os

import pytest

# The CPU backend sizes its KV cache from this (GiB); the tiny model needs little.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import protocol  # noqa: E402
import tiny_model  # noqa: E402

MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny_model.build(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def key() -> str:
    return protocol.generate_key()


@pytest.fixture(scope="session")
def channel(key) -> protocol.Channel:
    """The client's side of the channel."""
    return protocol.Channel(key)


@pytest.fixture(scope="session")
def worker_env(tiny_model_dir, key) -> dict[str, str]:
    """The container's variables, pointed at the tiny model."""
    return {
        "MODELS": str(tiny_model_dir),
        "ENCRYPTION_KEY": key,
        "MAX_MODEL_LEN": str(MAX_MODEL_LEN),
    }


@pytest.fixture(scope="session")
async def engine(worker_env):
    import rp_handler
    from config import WorkerConfig

    engine = rp_handler.start_engine(WorkerConfig.from_env(worker_env))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def worker(engine, worker_env):
    import rp_handler
    from config import WorkerConfig

    return rp_handler.Worker(engine, WorkerConfig.from_env(worker_env).inbox())


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
