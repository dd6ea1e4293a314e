"""Model locator and downloader: turns an entry of MODELS (or an adapter of
LORA_MODULES) into a local directory the engine can load, and fetches it only
when nothing local has it.

    python3 utils.py download ORG/NAME[@REVISION] [--into DIR]   # e.g. to bake an image

For `org/name[@revision]` it looks, in order:
1. for a local directory of that name, used as it is;
2. in RunPod's cached-model volume (CACHED_MODELS_DIR), then in the models
   baked into the image (BAKED_MODELS_DIR), then in the hub cache
   (HF_HUB_CACHE): all in the standard hub cache layout, the repo matched
   regardless of letter case, taking the snapshot its `refs/<revision>`
   (default `main`) names, else, with no revision asked for, the newest
   complete one;
3. else it downloads into the hub cache (or, where that is read-only, one on
   the container's disk): with hf_transfer when
   HF_HUB_ENABLE_HF_TRANSFER=1 (the image's default), listing the files
   through huggingface_hub and moving the bytes in parallel chunks; else with
   huggingface_hub's own downloader.

Rules:
- A snapshot without config.json (a LoRA adapter's: adapter_config.json),
  or without every weight file it names, is incomplete and never handed to
  the engine.
- Only what vLLM reads is fetched: config, tokenizer and generation files,
  and safetensors weights with their index (.bin weights only where a repo
  has no safetensors); never .pth, ONNX, GGUF, images or subfolders.
- Writes are atomic: a file enters the cache complete, under its final name,
  so a killed download never leaves something a later start takes for whole.
- Every failure is a `ModelError`: one line that names the model and says
  what to do.
- This module imports nothing heavy at load, and nothing of this project:
  the image bakes models with it alone.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

log = logging.getLogger("models")

CACHED_MODELS_DIR = "/runpod-volume/huggingface-cache/hub"  # where RunPod mounts them
BAKED_MODELS_DIR = "/models"  # where the Dockerfile bakes one
HUB = "https://huggingface.co"

# Files vLLM reads, at the root of a repo.
_WANTED = re.compile(r"[^/]+\.(json|safetensors|model|tiktoken|txt|jinja|py)")
_BIN_WEIGHTS = re.compile(r"(pytorch_model[^/]*|adapter_model)\.bin")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_PROGRESS_EVERY_S = 10.0

# We honour HF_HUB_ENABLE_HF_TRANSFER ourselves; huggingface_hub >= 1.0 warns
# at import that it no longer does, which would mislead the worker's users.
warnings.filterwarnings("ignore", message=".*HF_HUB_ENABLE_HF_TRANSFER", category=FutureWarning)


class ModelError(Exception):
    """A model could not be resolved; the message is one line saying why."""


@dataclass(frozen=True)
class ModelRef:
    """One entry of MODELS: a repo id (or a local directory), and a revision."""

    name: str
    revision: str | None = None

    @classmethod
    def parse(cls, entry: str) -> ModelRef:
        entry = entry.strip()
        if os.path.isdir(entry) or "@" not in entry:
            return cls(entry)
        name, _, revision = entry.rpartition("@")
        return cls(name, revision or None)

    def __str__(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name

    def problem(self) -> str | None:
        """Why this entry cannot name a model, or None: said before any
        download is tried, so that a typo is not reported as the network."""
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        if os.path.isdir(self.name):
            return None
        # A repo id has at most one "/" and never starts like a path.
        if self.name.startswith(("/", ".", "~")) or self.name.count("/") > 1:
            return f"{self}: no such directory"
        try:
            validate_repo_id(self.name)
        except HFValidationError:
            return f"{self}: neither a directory nor a Hugging Face repo id (org/name)"
        return None


def parse_models(value: str) -> tuple[ModelRef, ...]:
    """MODELS: comma-separated entries, each `org/name[@revision]` or a directory."""
    return tuple(ModelRef.parse(entry) for entry in value.split(",") if entry.strip())


def _default_hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


class ModelSources(BaseModel):
    """Where models are looked for and how they are fetched, from the
    environment (the standard Hugging Face variables included)."""

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    cached_models_dir: Path = Field(Path(CACHED_MODELS_DIR), alias="CACHED_MODELS_DIR")
    baked_models_dir: Path = Field(Path(BAKED_MODELS_DIR), alias="BAKED_MODELS_DIR")
    hub_cache: Path = Field(
        default_factory=lambda: Path(_default_hub_cache()), alias="HF_HUB_CACHE"
    )
    hf_transfer: bool = Field(False, alias="HF_HUB_ENABLE_HF_TRANSFER")
    offline: bool = Field(False, alias="HF_HUB_OFFLINE")
    endpoint: str = Field(HUB, alias="HF_ENDPOINT")
    token: SecretStr | None = Field(None, alias="HF_TOKEN", repr=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ModelSources:
        environ = os.environ if environ is None else environ
        names = [field.alias for field in cls.model_fields.values()]
        return cls.model_validate({n: environ[n] for n in names if environ.get(n, "").strip()})

    @property
    def caches(self) -> list[tuple[str, Path]]:
        return [
            ("RunPod's cached-model volume", self.cached_models_dir),
            ("the models baked into the image", self.baked_models_dir),
            ("the hub cache", self.hub_cache),
        ]

    def token_value(self) -> str | None:
        return self.token.get_secret_value() if self.token else None


# --- Finding a complete snapshot --------------------------------------------


def is_complete(directory: Path, adapter: bool = False) -> bool:
    """config.json and weights, and every shard a weight index names; for a
    LoRA adapter, adapter_config.json and its weights."""
    if adapter:
        weights = ("adapter_model.safetensors", "adapter_model.bin")
        has_weights = any((directory / name).is_file() for name in weights)
        return (directory / "adapter_config.json").is_file() and has_weights
    if not (directory / "config.json").is_file():
        return False
    for index in directory.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        if not all((directory / shard).is_file() for shard in shards):
            return False
    weights = [*directory.glob("*.safetensors"), *directory.glob("pytorch_model*.bin")]
    return any(weight.is_file() for weight in weights)  # is_file: no dangling link


def repo_folder(cache: Path, repo_id: str) -> Path | None:
    """`models--org--name` in a hub cache, matched regardless of letter case
    (RunPod's volume may hold a lowercased copy of a repo's folder)."""
    wanted = "models--" + repo_id.replace("/", "--")
    try:
        folders = [entry for entry in cache.iterdir() if entry.is_dir()]
    except OSError:
        return None
    exact = [folder for folder in folders if folder.name == wanted]
    folded = [folder for folder in folders if folder.name.lower() == wanted.lower()]
    return (exact or folded or [None])[0]


def find_snapshot(cache: Path, ref: ModelRef, adapter: bool = False) -> Path | None:
    """A complete snapshot of `ref` (a model, or a LoRA adapter) in a hub cache, or None."""
    folder = repo_folder(cache, ref.name)
    if folder is None:
        return None
    revision = ref.revision or "main"
    commit = revision if _COMMIT.fullmatch(revision) else _read_ref(folder, revision)
    if commit and is_complete(folder / "snapshots" / commit, adapter):
        return folder / "snapshots" / commit
    if ref.revision is not None:
        return None  # never another revision than the one asked for
    # refs/main missing, or naming an absent or incomplete snapshot.
    snapshots = sorted(
        (s for s in (folder / "snapshots").glob("*") if s.is_dir() and is_complete(s, adapter)),
        key=lambda snapshot: snapshot.stat().st_mtime,
        reverse=True,
    )
    return snapshots[0] if snapshots else None


def _read_ref(folder: Path, revision: str) -> str | None:
    try:
        return (folder / "refs" / revision).read_text().strip() or None
    except OSError:
        return None


def resolve(
    ref: ModelRef,
    sources: ModelSources,
    on_download: Callable[[int], None] = lambda _size: None,
    adapter: bool = False,
) -> Path:
    """The directory of a complete copy of `ref` (a LoRA adapter's, if
    `adapter`), downloading it if needed; `on_download` is told how many
    bytes a download fetched."""
    local = Path(ref.name)
    if local.is_dir():
        if not is_complete(local, adapter):
            raise ModelError(f"{ref}: the directory has no {_config_file(adapter)} or no weights")
        return local
    for where, cache in sources.caches:
        started = time.perf_counter()
        snapshot = find_snapshot(cache, ref, adapter)
        if snapshot is not None:
            elapsed_ms = (time.perf_counter() - started) * 1000
            log.info("%s: found in %s (%s), %.1f ms", ref, where, snapshot, elapsed_ms)
            return snapshot
    if sources.offline:
        raise ModelError(
            f"{ref}: HF_HUB_OFFLINE=1 and no cache holds a complete copy: "
            "unset HF_HUB_OFFLINE, or add the model to the endpoint's cached models"
        )
    snapshot, size = download(ref, sources, adapter)
    on_download(size)
    return snapshot


def _config_file(adapter: bool) -> str:
    return "adapter_config.json" if adapter else "config.json"


# --- Downloading ---------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    etag: str  # the blob's name in the hub cache: sha256 for LFS files, else the git oid


def select_files(files: list[RemoteFile]) -> list[RemoteFile]:
    """What vLLM reads: see the module's rules."""
    wanted = [f for f in files if _WANTED.fullmatch(f.path)]
    if not any(f.path.endswith(".safetensors") for f in wanted):
        wanted += [f for f in files if _BIN_WEIGHTS.fullmatch(f.path)]
    return wanted


def download(ref: ModelRef, sources: ModelSources, adapter: bool = False) -> tuple[Path, int]:
    """Download `ref` into the hub cache: its snapshot, and the bytes fetched."""
    from huggingface_hub import HfApi

    sources = _with_writable_hub_cache(ref, sources)
    api = HfApi(endpoint=sources.endpoint, token=sources.token_value())
    with _hub_errors(ref, sources):
        info = api.model_info(ref.name, revision=ref.revision, files_metadata=True)
        files = select_files(
            [
                RemoteFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else s.blob_id)
                for s in info.siblings or []
            ]
        )
        _check_disk_space(ref, files, sources.hub_cache)
        use_hf_transfer = sources.hf_transfer and _hf_transfer_available()
        log.info(
            "%s: downloading %d files (%s) from %s with %s",
            ref,
            len(files),
            _size(sum(f.size for f in files)),
            sources.endpoint,
            "hf_transfer" if use_hf_transfer else "huggingface_hub",
        )
        if use_hf_transfer:
            _download_with_hf_transfer(ref, info.sha, files, sources)
        else:
            from huggingface_hub import snapshot_download

            snapshot_download(
                ref.name,
                revision=info.sha,
                allow_patterns=[f.path for f in files],
                cache_dir=sources.hub_cache,
                endpoint=sources.endpoint,
                token=sources.token_value(),
            )
            _write_atomically(
                sources.hub_cache / _folder_name(ref) / "refs" / (ref.revision or "main"), info.sha
            )
    snapshot = find_snapshot(sources.hub_cache, ref, adapter)
    if snapshot is None:
        raise ModelError(
            f"{ref}: downloaded, but the repo has no {_config_file(adapter)} or no weights"
        )
    return snapshot, sum(f.size for f in files)


def _with_writable_hub_cache(ref: ModelRef, sources: ModelSources) -> ModelSources:
    """The hub cache may sit on a read-only mount (RunPod's model cache, say):
    then downloads go to a cache on the container's own disk instead."""
    try:
        sources.hub_cache.mkdir(parents=True, exist_ok=True)
        probe = sources.hub_cache / f".writable-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return sources
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "huggingface-hub"
        log.warning("%s: %s is not writable; downloading into %s", ref, sources.hub_cache, fallback)
        return sources.model_copy(update={"hub_cache": fallback})


def _folder_name(ref: ModelRef) -> str:
    return "models--" + ref.name.replace("/", "--")


def _hf_transfer_available() -> bool:
    try:
        import hf_transfer  # noqa: F401
    except ImportError:
        log.warning("HF_HUB_ENABLE_HF_TRANSFER=1 but hf_transfer is not installed")
        return False
    return True


def _download_with_hf_transfer(
    ref: ModelRef, commit: str, files: list[RemoteFile], sources: ModelSources
) -> None:
    """Each file in parallel chunks into blobs/, then the snapshot's links and
    the ref, all in the hub cache layout that huggingface_hub itself writes."""
    import hf_transfer
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    folder = sources.hub_cache / _folder_name(ref)
    blobs, snapshot = folder / "blobs", folder / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers(token=sources.token_value())
    progress = _Progress(str(ref), sum(f.size for f in files))
    for remote in files:
        blob = blobs / remote.etag
        if not (blob.is_file() and blob.stat().st_size == remote.size):
            url = hf_hub_url(ref.name, remote.path, revision=commit, endpoint=sources.endpoint)
            partial = blobs / f"{remote.etag}.incomplete"
            partial.unlink(missing_ok=True)  # a killed attempt's leftovers
            try:
                hf_transfer.download(
                    url=url,
                    filename=str(partial),
                    max_files=64,
                    chunk_size=10 * 1024 * 1024,
                    parallel_failures=3,
                    max_retries=5,
                    headers=headers,
                    callback=progress.advance,
                )
            except Exception as error:  # hf_transfer raises plain Exceptions
                partial.unlink(missing_ok=True)
                raise ModelError(f"{ref}: downloading {remote.path} failed: {error}") from None
            if partial.stat().st_size != remote.size:
                partial.unlink()
                raise ModelError(f"{ref}: {remote.path} arrived truncated; start again to retry")
            os.replace(partial, blob)
        else:
            progress.advance(remote.size)
        _link_atomically(snapshot / remote.path, os.path.relpath(blob, snapshot))
    _write_atomically(folder / "refs" / (ref.revision or "main"), commit)
    progress.done()


def _link_atomically(link: Path, target: str) -> None:
    temporary = link.with_name(f".{link.name}.linking")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, link)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.writing")
    temporary.write_text(text)
    os.replace(temporary, path)


def _check_disk_space(ref: ModelRef, files: list[RemoteFile], cache: Path) -> None:
    needed = sum(f.size for f in files)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if needed > free:
        raise ModelError(
            f"{ref}: needs {_size(needed)} but {cache} has {_size(free)} free: give the "
            "worker a larger disk or network volume, or use RunPod's cached models"
        )


@contextmanager
def _hub_errors(ref: ModelRef, sources: ModelSources) -> Iterator[None]:
    """Turns whatever a download raises into a one-line ModelError."""
    try:
        yield
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(f"{ref}: {_explain(error, sources)}") from None


def _explain(error: Exception, sources: ModelSources) -> str:
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        if sources.token:
            return "gated, and HF_TOKEN was refused: accept its terms on the Hub with that account"
        return "gated: set HF_TOKEN to a token whose account accepted its terms"
    if isinstance(error, errors.RevisionNotFoundError):
        return "no such revision on the Hub: check MODELS"
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"no such model on {sources.endpoint}: check MODELS (a private one needs HF_TOKEN)"
    if isinstance(error, errors.HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status in (401, 403):
            return f"HF_TOKEN was refused ({status}): check the token"
        return f"the Hub answered {status}: try again later"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "the disk filled up while downloading: give the worker a larger disk"
    return (
        f"cannot download from {sources.endpoint} ({type(error).__name__}): check the "
        "network, or use RunPod's cached models"
    )


class _Progress:
    """Logs a download's progress at a calm cadence: bytes, rate, ETA."""

    def __init__(self, name: str, total: int):
        self.name, self.total = name, total
        self.done_bytes = 0
        self.started = self._last_log = time.monotonic()
        self._lock = threading.Lock()

    def advance(self, size: int) -> None:
        with self._lock:
            self.done_bytes += size
            now = time.monotonic()
            if now - self._last_log < _PROGRESS_EVERY_S:
                return
            self._last_log = now
        rate = self.done_bytes / max(now - self.started, 1e-9)
        eta = (self.total - self.done_bytes) / rate if rate else float("inf")
        log.info(
            "%s: %s of %s (%.0f%%), %s/s, about %.0f s left",
            self.name,
            _size(self.done_bytes),
            _size(self.total),
            100 * self.done_bytes / max(self.total, 1),
            _size(rate),
            eta,
        )

    def done(self) -> None:
        elapsed = time.monotonic() - self.started
        log.info(
            "%s: downloaded %s in %.1f s (%s/s)",
            self.name,
            _size(self.total),
            elapsed,
            _size(self.total / max(elapsed, 1e-9)),
        )


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="put a model into a hub cache")
    fetch.add_argument("model", help="org/name[@revision]")
    fetch.add_argument("--into", type=Path, help="the hub cache to fill (default: HF_HUB_CACHE)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sources = ModelSources.from_env()
    if args.into:
        sources = sources.model_copy(update={"hub_cache": args.into})
    try:
        print(download(ModelRef.parse(args.model), sources)[0])
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
