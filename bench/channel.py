"""What encryption and length-hiding padding cost per streamed item.

    .venv/bin/python bench/channel.py

Seals the same stream of deltas (one English word each, as a fast network
streams them) three ways in one run: plaintext JSON (what an unencrypted
worker would post), Fernet without padding, and Fernet with the default
padding bucket. Reports microseconds per item and bytes on the wire per
token, as posted by the runpod SDK (`{"output": ...}` as JSON).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import protocol  # noqa: E402
from protocol import StreamItem, Usage  # noqa: E402

TEXT = (
    "Fernet guarantees that a message encrypted using it cannot be manipulated "
    "or read without the key. It uses AES in CBC mode with a 128-bit key for "
    "encryption and HMAC with SHA256 for authentication, and every token "
    "carries the time at which it was created. Streaming a completion token "
    "by token means one such token per delta, so its cost must stay small "
    "next to the engine's own time per token, and its size must not tell an "
    "observer how long each token was."
)
DELTAS = re.findall(r"\s*\S+", TEXT)


def stream(deltas: list[str]) -> list[StreamItem]:
    items = [StreamItem(text) for text in deltas[:-1]]
    items.append(StreamItem(deltas[-1], "stop", Usage(42, len(deltas))))
    return items


def measure(seal, items: list[StreamItem], repeats: int = 7) -> tuple[float, float]:
    """(microseconds per item, median of repeats; wire bytes per item)."""
    runs = timeit.repeat(lambda: [seal(item) for item in items], number=20, repeat=repeats)
    per_item_us = statistics.median(runs) / (20 * len(items)) * 1e6
    wire = sum(len(json.dumps({"output": seal(item)})) for item in items) / len(items)
    return per_item_us, wire


def main() -> None:
    key = protocol.generate_key()
    items = stream(DELTAS)
    ways = {
        "plaintext (no encryption)": lambda item: json.loads(item.to_json()),
        "Fernet, no padding": protocol.Channel(key, item_bucket=0).seal_item,
        f"Fernet, padded to {protocol.ITEM_BUCKET_BYTES} B": protocol.Channel(key).seal_item,
    }
    results = {name: measure(seal, items) for name, seal in ways.items()}
    base_us, base_bytes = results["plaintext (no encryption)"]
    print(f"{len(items)} items, one word each\n")
    print(f"{'':30} {'µs/item':>8} {'bytes/token':>12} {'× plaintext bytes':>18}")
    for name, (micros, wire) in results.items():
        print(f"{name:30} {micros:8.1f} {wire:12.0f} {wire / base_bytes:18.2f}")
    padded = protocol.Channel(key).seal_item
    lengths = {len(padded(item)["ciphertext"]) for item in items}
    print(f"\ndistinct ciphertext lengths with padding: {len(lengths)}")
    print(json.dumps({name: {"us_per_item": round(us, 2), "bytes_per_token": round(b, 1)}
                      for name, (us, b) in results.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
