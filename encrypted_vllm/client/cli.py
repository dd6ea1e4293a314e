"""The client's command line (`encrypted-vllm`, or `python3 client.py` in a
checkout): keys, a worker's card, and one streamed answer.

    encrypted-vllm --endpoint-id ID --prompt "Hello"    # RUNPOD_API_KEY, ENCRYPTION_KEY
    encrypted-vllm --base-url http://127.0.0.1:8000/v2/local --prompt "Hello"
    encrypted-vllm --generate-key

Rules:
- Arguments are parsed before the library is imported, so `--help` and
  `--version` answer at once.
- Exit codes: 0 done, 1 the job or the endpoint failed, 2 bad arguments or
  configuration, 130 interrupted. Errors name what to fix, never the text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from encrypted_vllm import __version__


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encrypted-vllm",
        description="Call an encrypted vLLM worker on RunPod: every prompt and token "
        "crosses RunPod Fernet-encrypted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--generate-key", action="store_true", help="print a new ENCRYPTION_KEY")
    parser.add_argument(
        "--key-id",
        action="store_true",
        help="print the fingerprint of each key of ENCRYPTION_KEY, as the worker logs it",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--endpoint-id", help="the RunPod endpoint to call")
    where.add_argument("--base-url", help="an endpoint's URL, e.g. the loopback endpoint's")
    parser.add_argument("--prompt", help="the user message (sent through the chat template)")
    parser.add_argument("--system", help="a system message before it")
    parser.add_argument("--raw", action="store_true", help="send --prompt as a plain completion")
    parser.add_argument("--json-schema", metavar="FILE", help="answer in JSON matching this schema")
    parser.add_argument("--describe", action="store_true", help="print what the endpoint serves")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    return parser


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    import pydantic

    from encrypted_vllm.client.library import Client, ClientError
    from encrypted_vllm.wire import channel

    if args.generate_key:
        print(channel.generate_key())
        return 0
    try:
        if args.key_id:
            for key in channel.load_keys(os.environ.get("ENCRYPTION_KEY")):
                print(key.id)
            return 0
        if not (args.endpoint_id or args.base_url) or (args.prompt is None and not args.describe):
            cli.error(
                "give --endpoint-id (or --base-url) and --prompt (or --describe), "
                "or --generate-key, or --key-id"
            )
        with Client(args.endpoint_id, base_url=args.base_url) as client:
            if args.describe:
                print(json.dumps(client.describe().to_dict(), indent=2))
                return 0
            with client.stream(**request_of(args)) as deltas:
                for delta in deltas:
                    print(delta, end="", flush=True)
    except (ValueError, pydantic.ValidationError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ClientError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130
    done = deltas.completion
    print()
    if done and done.usage:
        rate = f", {done.tokens_per_s:.1f} tokens/s" if done.tokens_per_s else ""
        ttft = f"TTFT {done.ttft_s * 1000:.0f} ms" if done.ttft_s is not None else "no text"
        print(f"[{done.usage.completion_tokens} tokens, {ttft}{rate}]", file=sys.stderr)
    return 0


def request_of(args: argparse.Namespace) -> dict[str, Any]:
    """The wire request the command line asks for."""
    request: dict[str, Any] = {
        "sampling_params": {"max_tokens": args.max_tokens, "temperature": args.temperature}
    }
    if args.raw:
        request["prompt"] = args.prompt
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        request["messages"] = [*system, {"role": "user", "content": args.prompt}]
    if args.json_schema:
        with open(args.json_schema) as schema:
            request["structured_output"] = {"json_schema": json.load(schema)}
    return request


if __name__ == "__main__":
    sys.exit(main())
