"""What an image costs the worker before the engine sees it: decoding,
checking and naming it (`worker.images.load`), CPU time per image.

    .venv/bin/python bench/images.py [--repeat 20]

The picture is a smooth 1024x768 gradient (photo-like, so that its
compressed size is realistic), as a JPEG at quality 85 and as a PNG, each
sent as the `data:` URL that `image_part` makes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy  # noqa: E402
from PIL import Image  # noqa: E402

from encrypted_vllm.client.library import image_part  # noqa: E402
from encrypted_vllm.wire.protocol import ImageURL  # noqa: E402
from encrypted_vllm.worker import images  # noqa: E402


def gradient(width: int = 1024, height: int = 768) -> Image.Image:
    x, y = numpy.linspace(0, 255, width), numpy.linspace(0, 255, height)
    channels = [
        numpy.add.outer(y, x) / 2,
        numpy.outer(numpy.ones(height), x),
        numpy.add.outer(y, 0 * x),
    ]
    return Image.fromarray(numpy.stack(channels, -1).astype("uint8"))


async def cpu_per_image(url: ImageURL, repeat: int) -> float:
    started = time.process_time()
    for _ in range(repeat):
        await images.load([url], limit=1, allow_urls=False, cache_salt="salt")
    return (time.process_time() - started) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    picture = gradient()
    for kind, options in (("JPEG", {"quality": 85}), ("PNG", {})):
        buffer = io.BytesIO()
        picture.save(buffer, format=kind, **options)
        url = ImageURL(**image_part(buffer.getvalue())["image_url"])
        seconds = asyncio.run(cpu_per_image(url, args.repeat))
        print(f"1024x768 {kind}, {len(buffer.getvalue())} bytes: {seconds * 1000:.1f} ms of CPU")


if __name__ == "__main__":
    main()
