"""Model loading: how long resolving a cached model takes, and how fast a
200 MB weights file downloads through hf_transfer and through
huggingface_hub's own downloader, side by side in one run.

    .venv/bin/python bench/models.py

Downloads come from the tests' loopback Hugging Face Hub (its own process),
once as loopback allows and once with each connection capped at 50 MB/s, as
a CDN caps single flows; each way runs three times into a fresh cache and
the median counts.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from encrypted_vllm.worker import models as utils  # noqa: E402
from tests.local_hub import HubProcess, hub_layout  # noqa: E402

SIZE = 200 * 1000 * 1000
CAP = 50 * 1000 * 1000


def resolve_times(work: Path) -> dict:
    """A volume holding 50 other models and ours under a lowercased name."""
    volume = work / "volume"
    files = {"config.json": b"{}", "model.safetensors": b"w", "tokenizer.json": b"{}"}
    for n in range(50):
        hub_layout(volume, f"models--other--model-{n}", files)
    hub_layout(volume, "models--org--cached-model", files)
    sources = utils.ModelSources.from_env(
        {"CACHED_MODELS_DIR": str(volume), "HF_HUB_CACHE": str(work / "empty")}
    )
    samples = []
    for _ in range(200):
        started = time.perf_counter()
        utils.resolve(utils.ModelRef("Org/Cached-Model"), sources)
        samples.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(statistics.median(samples), 3), "max_ms": round(max(samples), 3)}


def download_rate(hub: HubProcess, work: Path, hf_transfer: bool) -> float:
    """MB/s for the 200 MB file, median of three downloads into fresh caches."""
    rates = []
    for attempt in range(3):
        cache = work / f"cache-{hf_transfer}-{attempt}-{time.monotonic_ns()}"
        sources = utils.ModelSources.from_env(
            {
                "CACHED_MODELS_DIR": str(work / "none"),
                "BAKED_MODELS_DIR": str(work / "none"),
                "HF_HUB_CACHE": str(cache),
                "HF_ENDPOINT": hub.url,
                "HF_HUB_ENABLE_HF_TRANSFER": "1" if hf_transfer else "0",
            }
        )
        started = time.perf_counter()
        utils.download(utils.ModelRef("Org/Big"), sources)
        rates.append(SIZE / 1e6 / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-models-"))
    results: dict = {"resolve_cached_model": resolve_times(work)}
    hub = HubProcess(work / "hub")
    try:
        hub.add("Org/Big", {"config.json": b"{}", "model.safetensors": os.urandom(SIZE)})
        for label, cap in (("loopback", 0), ("50 MB/s per connection", CAP)):
            hub.cap_each_connection(cap)
            ours = download_rate(hub, work, hf_transfer=True)
            theirs = download_rate(hub, work, hf_transfer=False)
            results[label] = {
                "hf_transfer_MBps": round(ours, 1),
                "huggingface_hub_MBps": round(theirs, 1),
                "ratio": round(ours / theirs, 2),
            }
    finally:
        hub.close()
    resolve = results.pop("resolve_cached_model")
    print(f"resolve a cached model (51 in the volume): p50 {resolve['p50_ms']} ms, "
          f"max {resolve['max_ms']} ms over 200 runs\n")  # fmt: skip
    print(f"200 MB download      {'hf_transfer':>12} {'huggingface_hub':>16} {'ratio':>6}")
    for label, row in results.items():
        print(
            f"{label:22} {row['hf_transfer_MBps']:8.0f} MB/s {row['huggingface_hub_MBps']:11.0f} "
            f"MB/s {row['ratio']:6.2f}"
        )
    print(json.dumps({"resolve_cached_model": resolve, **results}))


if __name__ == "__main__":
    main()
