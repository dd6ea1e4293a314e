"""LoRA adapters: LORA_MODULES read, each adapter found (or downloaded) as the
models of MODELS are, and each request's adapter chosen by its name.

    LORA_MODULES='sql=org/sql-lora,support=/adapters/support'
    LORA_MODULES='[{"name": "acme", "path": "org/acme-lora", "keys": ["1a2b3c4d"]}]'

Rules:
- Adapters are named as `vllm serve --lora-modules` names them: `name=path`
  entries, or a JSON list of `{"name", "path"}` objects; `path` is a local
  folder, or a Hub repo (`org/name[@revision]`) looked up in RunPod's cached
  models, the image and the hub cache before it is downloaded
  (`models.resolve`).
- An adapter with `keys` (key fingerprints, as `encrypted-vllm --key-id`
  prints them) serves only requests opened by one of those keys of
  ENCRYPTION_KEY; one without `keys` serves every key.
- A request that names an adapter the worker lacks, or one its key may not
  use, is refused with one and the same reason, so that a tenant cannot
  learn another's adapter names by asking; the card lists, to each key, the
  adapters it may use.
- An adapter's rank must fit MAX_LORA_RANK: checked at start, not at the
  first request that names it.
- This module does not import vLLM (configuration is checked without it);
  `Adapters` builds vLLM's `LoRARequest`s once the engine is to start.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from encrypted_vllm.wire.protocol import ADAPTER_NAME, ErrorCode, ProtocolError
from encrypted_vllm.worker import models
from encrypted_vllm.worker.models import ModelRef, ModelSources

# vLLM's default MAX_LORA_RANK (LoRAConfig.max_lora_rank).
DEFAULT_MAX_LORA_RANK = 16
UNKNOWN_ADAPTER = "the worker has no adapter of that name for this key"
# A key's fingerprint (channel.Key.id): 8 hex digits.
_KEY_ID = r"[0-9a-f]{8}"


class AdapterSpec(BaseModel):
    """One entry of LORA_MODULES."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    name: str = Field(pattern=ADAPTER_NAME)
    path: str = Field(min_length=1)
    keys: frozenset[str] | None = Field(None, min_length=1)  # key fingerprints; None: every key

    @property
    def ref(self) -> ModelRef:
        return ModelRef.parse(self.path)

    def serves(self, key_id: str) -> bool:
        return self.keys is None or key_id in self.keys


def parse_lora_modules(value: str) -> tuple[AdapterSpec, ...]:
    """LORA_MODULES: a JSON list of adapters, or `name=path` entries
    separated by commas. ValueError says what is wrong, naming an entry by
    its name, or by its path where the path is at fault (MODELS' rule:
    paths and repo ids are not secrets)."""
    text = value.strip()
    if text.startswith("["):
        try:
            entries: Any = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("is not valid JSON") from None
        if not isinstance(entries, list):
            raise ValueError('must be a JSON list of {"name", "path"} objects')
    else:
        entries = []
        for entry in filter(None, (part.strip() for part in text.split(","))):
            name, equals, path = entry.partition("=")
            if not equals:
                raise ValueError("entries are name=path, or the value a JSON list")
            entries.append({"name": name.strip(), "path": path.strip()})
    specs = []
    for number, entry in enumerate(entries, start=1):
        try:
            specs.append(AdapterSpec.model_validate(entry))
        except ValidationError as error:
            detail = error.errors(include_input=False, include_url=False)[0]
            field = ".".join(map(str, detail["loc"])) or "the entry"
            raise ValueError(f"adapter {number}: {field}: {detail['msg']}") from None
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("two adapters have the same name")
    for spec in specs:
        if problem := spec.ref.problem():
            raise ValueError(f"adapter {spec.name!r}: {problem}")
        if any(not re.fullmatch(_KEY_ID, key) for key in spec.keys or ()):
            raise ValueError(f"adapter {spec.name!r}: keys are key ids (encrypted-vllm --key-id)")
    return tuple(specs)


class Adapters:
    """The worker's adapters, found on disk, as the engine takes them."""

    def __init__(self, specs: Iterable[AdapterSpec] = (), folders: Iterable[Path] = ()):
        from vllm.lora.request import LoRARequest

        self.specs = {spec.name: spec for spec in specs}
        # vLLM tells adapters apart by a positive integer id.
        pairs = zip(self.specs.values(), folders, strict=True)
        self.requests = {
            spec.name: LoRARequest(spec.name, number, str(folder))
            for number, (spec, folder) in enumerate(pairs, start=1)
        }

    @classmethod
    def resolve(
        cls,
        specs: tuple[AdapterSpec, ...],
        sources: ModelSources,
        max_lora_rank: int | None,
        on_download: Callable[[int], None] = lambda _size: None,
    ) -> Adapters:
        """Each adapter's folder (downloaded if need be); ModelError if one
        is missing, incomplete or of a rank above MAX_LORA_RANK."""
        folders = []
        limit = max_lora_rank or DEFAULT_MAX_LORA_RANK
        for spec in specs:
            folder = models.resolve(spec.ref, sources, on_download, adapter=True)
            rank = _rank(folder)
            if rank is None:
                raise models.ModelError(f"adapter {spec.name!r}: adapter_config.json has no rank")
            if rank > limit:
                raise models.ModelError(
                    f"adapter {spec.name!r}: its rank {rank} exceeds MAX_LORA_RANK={limit}"
                )
            folders.append(folder)
        return cls(specs, folders)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def for_request(self, name: str, key_id: str | None):
        """vLLM's `LoRARequest` of adapter `name` for a request opened by
        `key_id`; ProtocolError if there is none it may use."""
        spec = self.specs.get(name)
        if spec is None or not spec.serves(key_id or ""):
            raise ProtocolError(ErrorCode.INVALID_INPUT, UNKNOWN_ADAPTER)
        return self.requests[name]

    def names_for(self, key_id: str | None) -> tuple[str, ...]:
        """The adapters a request under `key_id` may name, in LORA_MODULES' order."""
        return tuple(name for name, spec in self.specs.items() if spec.serves(key_id or ""))


def _rank(folder: Path) -> int | None:
    try:
        rank = json.loads((folder / "adapter_config.json").read_text()).get("r")
    except (OSError, ValueError, AttributeError):
        return None
    return rank if isinstance(rank, int) and rank > 0 else None
