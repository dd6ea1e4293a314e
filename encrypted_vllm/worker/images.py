"""A request's images, read and checked before vLLM sees them.

Rules:
- An image is a `data:` URL, decoded here, or, only where ALLOW_IMAGE_URLS
  is set, an http(s) URL that this worker fetches: a request from the
  worker to a third party, which learns the URL (and the address of the
  worker) in the clear; RunPod's queue still sees only ciphertext.
- Every image is checked against the protocol's limits before its pixels
  are decoded: MAX_IMAGE_BYTES as it arrives (a fetch stops at the limit),
  MAX_IMAGE_PIXELS from the header, then only the formats vLLM itself opens.
  A prompt holds at most the worker's LIMIT_MM_PER_PROMPT images, and a
  text-only model takes none.
- Images are decoded in a thread, so that a large one never stalls the
  other streams.
- Each image is named to vLLM's caches (its processed-image cache and its
  prefix cache) by a hash of its bytes under the key's cache salt: tenants
  never share an image's cache entries, so none can time whether another
  sent the same image.
- Every failure is a `ProtocolError` with a fixed reason; nothing of an
  image, its URL or its bytes is logged.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import io
import logging
from typing import Any

import httpx
from PIL import Image
from vllm.multimodal.image import convert_image_mode, normalize_image, open_image

from encrypted_vllm.wire.protocol import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    ErrorCode,
    ImageURL,
    ProtocolError,
)

log = logging.getLogger("worker")

# How long fetching one remote image may take, whole; vLLM's own fetch
# timeout (VLLM_IMAGE_FETCH_TIMEOUT) defaults to 5 s.
FETCH_TIMEOUT_S = 10.0
NO_IMAGES = "this worker's model takes no images"
NO_IMAGE_URLS = (
    "this worker fetches no image URLs (ALLOW_IMAGE_URLS): send the image as a data: URL"
)


def _refuse(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_INPUT, reason)


async def load(
    images: list[ImageURL],
    *,
    limit: int,
    allow_urls: bool,
    cache_salt: str | None,
) -> list[dict[str, Any]]:
    """The content parts that give vLLM's renderer these images, in order
    (`image_pil` parts, each with its cache name); ProtocolError if one
    cannot be served."""
    if limit == 0:
        raise _refuse(NO_IMAGES)
    if len(images) > limit:
        raise _refuse(f"request exceeds the worker's LIMIT_MM_PER_PROMPT image={limit}")
    if not allow_urls and not all(image.is_data for image in images):
        raise _refuse(NO_IMAGE_URLS)
    datas = await asyncio.gather(*(_bytes_of(image) for image in images))
    parts = []
    for data in datas:
        picture = await asyncio.to_thread(_decode, data)
        name = hashlib.sha256((cache_salt or "").encode() + b"\0" + data).hexdigest()
        parts.append({"type": "image_pil", "image_pil": picture, "uuid": name})
    return parts


async def _bytes_of(image: ImageURL) -> bytes:
    if image.is_data:
        encoded = image.url.partition(",")[2]
        try:
            data = binascii.a2b_base64(encoded, strict_mode=True)
        except (binascii.Error, ValueError):
            raise _refuse("an image's data URL is not valid base64") from None
    else:
        data = await _fetch(image.url)
    if len(data) > MAX_IMAGE_BYTES:
        raise _refuse(f"request exceeds MAX_IMAGE_BYTES={MAX_IMAGE_BYTES}")
    return data


async def _fetch(url: str) -> bytes:
    """The image at `url`, read up to MAX_IMAGE_BYTES and no further."""
    received = bytearray()
    try:
        async with (
            httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=True) as http,
            asyncio.timeout(FETCH_TIMEOUT_S),
            http.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise _refuse("an image URL did not answer with an image")
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) > MAX_IMAGE_BYTES:
                    raise _refuse(f"request exceeds MAX_IMAGE_BYTES={MAX_IMAGE_BYTES}")
    except (httpx.HTTPError, TimeoutError):
        log.info("could not fetch an image URL")
        raise _refuse("an image URL could not be fetched") from None
    return bytes(received)


def _decode(data: bytes) -> Image.Image:
    try:
        picture = open_image(io.BytesIO(data))  # reads the header only
        width, height = picture.size
        if width * height > MAX_IMAGE_PIXELS:
            raise _refuse(f"request exceeds MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
        picture.load()
    except ProtocolError:
        raise
    except Exception:  # Pillow's errors are many: unknown format, truncated, a bomb...
        raise _refuse("an image could not be decoded (PNG, JPEG, WebP, GIF...)") from None
    return convert_image_mode(normalize_image(picture), "RGB")
