"""Images in the prompt end to end: the real worker process on a tiny
vision-language model (tiny_vision_model), behind the loopback endpoint,
its jobs encrypted, each answer compared with vLLM's own greedy output for
the same image (an engine in this process, with the worker's configuration,
given the image as a data: URL that vLLM decodes itself); the limits and
refusals; and the gateway passing images from the unmodified `openai` and
`anthropic` SDKs (chat completions, Responses, Messages)."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import os
import threading

import anthropic
import pytest
from PIL import Image

import encrypted_vllm
from encrypted_vllm.client.library import JobFailed, image_part
from encrypted_vllm.wire import protocol
from encrypted_vllm.wire.protocol import ErrorCode
from encrypted_vllm.worker import images
from tests import tiny_vision_model
from tests.conftest import engine_for, worker_behind_endpoint
from tests.gateway_process import in_front_of
from tests.jobs import GREEDY, only_error, open_all, run_job

QUESTION = "What is this?"
LIMIT = 2  # the workers' LIMIT_MM_PER_PROMPT


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


RED = png(Image.new("RGB", (64, 64), (220, 20, 20)))
CHECKER = png(
    Image.frombytes(
        "L", (64, 64), bytes(255 * ((x // 8 + y // 8) % 2) for y in range(64) for x in range(64))
    ).convert("RGB")
)


def asking(*pictures: bytes, url: str | None = None) -> list[dict]:
    parts = [image_part(picture) for picture in pictures]
    if url is not None:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION}, *parts]}]


@pytest.fixture(scope="module")
def vision_model_dir(tmp_path_factory):
    return tiny_vision_model.build(tmp_path_factory.mktemp("models") / "tiny-vision")


@pytest.fixture(scope="module")
def vision_env(vision_model_dir, key) -> dict[str, str]:
    return {
        "MODELS": str(vision_model_dir),
        "ENCRYPTION_KEY": key,
        "MAX_MODEL_LEN": "512",
        "LIMIT_MM_PER_PROMPT": f"image={LIMIT}",
    }


@pytest.fixture(scope="module")
async def vision_engine(vision_env):
    """The ground truth, in this process, with the worker's configuration."""
    with engine_for(vision_env) as engine:
        yield engine


@pytest.fixture(scope="module")
def vision_worker(vision_engine, vision_env):
    """The job handler on that engine (image URLs not allowed: the default)."""
    from encrypted_vllm.worker.config import WorkerConfig
    from encrypted_vllm.worker.handler import Worker

    return Worker(vision_engine, WorkerConfig.from_env(vision_env).inbox())


@contextlib.contextmanager
def image_server(body: bytes):
    """A loopback web server that answers every GET with `body` as a PNG."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # a worker may stop reading at its limit
                self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/picture.png"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def vision_live(vision_env, key, tmp_path_factory):
    """The real worker process, allowed to fetch image URLs (on loopback)."""
    log_path = tmp_path_factory.mktemp("vision-worker") / "worker.log"
    env = {**os.environ, **vision_env, "ALLOW_IMAGE_URLS": "true"}
    with worker_behind_endpoint(env, log_path, 600, key) as served:
        yield served


async def truth(engine, messages: list[dict], *, ignore_eos: bool = True) -> str:
    """vLLM's own greedy answer: its renderer decodes the data: URLs itself."""
    from vllm import SamplingParams
    from vllm.renderers import ChatParams
    from vllm.sampling_params import RequestOutputKind

    renderer = engine.renderer
    _, (engine_input,) = await renderer.render_chat_async(
        [messages],
        ChatParams(chat_template_kwargs={"add_generation_prompt": True}),
        renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False),
    )
    params = SamplingParams(
        temperature=0,
        max_tokens=GREEDY["max_tokens"],
        ignore_eos=ignore_eos,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    async for output in engine.generate(engine_input, params, f"truth-{id(messages)}"):
        final = output
    return final.outputs[0].text


async def test_an_encrypted_image_streams_the_engines_greedy_answer(vision_live, vision_engine):
    red, checker, none = (
        await truth(vision_engine, asking(RED)),
        await truth(vision_engine, asking(CHECKER)),
        await truth(vision_engine, asking()),
    )
    assert len({red, checker, none}) == 3  # the image decides the answer
    async with vision_live.async_client() as client:
        streamed = [
            delta
            async for delta in await client.stream(messages=asking(RED), sampling_params=GREEDY)
        ]
        assert "".join(streamed) == red
        assert len(streamed) > 1
        other = await client.run_sync(messages=asking(CHECKER), sampling_params=GREEDY)
        assert other.text == checker
        card = await client.describe()
    assert card.images == LIMIT


async def test_two_images_in_a_prompt_and_the_limit(vision_live, vision_engine):
    expected = await truth(vision_engine, asking(RED, CHECKER))
    async with vision_live.async_client() as client:
        answer = await client.run_sync(messages=asking(RED, CHECKER), sampling_params=GREEDY)
        assert answer.text == expected
        with pytest.raises(JobFailed) as failed:
            await client.run_sync(messages=asking(RED, CHECKER, RED), sampling_params=GREEDY)
    assert (failed.value.code, failed.value.reason) == (
        ErrorCode.INVALID_INPUT,
        f"request exceeds the worker's LIMIT_MM_PER_PROMPT image={LIMIT}",
    )


async def test_an_image_url_is_fetched_where_the_worker_allows_it(vision_live, vision_engine):
    expected = await truth(vision_engine, asking(RED))
    async with vision_live.async_client() as client:
        with image_server(RED) as url:
            answer = await client.run_sync(messages=asking(url=url), sampling_params=GREEDY)
        assert answer.text == expected
        # A body past MAX_IMAGE_BYTES is cut off at the limit and refused.
        with image_server(RED + bytes(protocol.MAX_IMAGE_BYTES)) as url:
            with pytest.raises(JobFailed) as failed:
                await client.run_sync(messages=asking(url=url), sampling_params=GREEDY)
        assert failed.value.reason == f"request exceeds MAX_IMAGE_BYTES={protocol.MAX_IMAGE_BYTES}"
        with pytest.raises(JobFailed) as failed:
            await client.run_sync(
                messages=asking(url="http://127.0.0.1:9/none.png"), sampling_params=GREEDY
            )
        assert failed.value.reason == "an image URL could not be fetched"


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("data:image/png;base64,@@not base64@@", "an image's data URL is not valid base64"),
        (
            data_url(b"not an image at all"),
            "an image could not be decoded (PNG, JPEG, WebP, GIF...)",
        ),
        (data_url(RED[: len(RED) // 2]), "an image could not be decoded (PNG, JPEG, WebP, GIF...)"),
        (
            # A 1-bit PNG of a few hundred bytes that claims 8K UHD plus a pixel.
            data_url(png(Image.new("1", (7681, 4320)))),
            f"request exceeds MAX_IMAGE_PIXELS={protocol.MAX_IMAGE_PIXELS}",
        ),
        ("https://images.example/cat.png", images.NO_IMAGE_URLS),
    ],
)
async def test_bad_images_are_refused_and_the_worker_serves_on(
    vision_worker, vision_engine, client_channel, url, reason
):
    refused = only_error(
        await run_job(
            vision_worker,
            client_channel.seal_request(
                protocol.validate_request(messages=asking(url=url), sampling_params=GREEDY)
            ),
        )
    )
    assert (refused.code, refused.reason) == (ErrorCode.INVALID_INPUT, reason)
    served = open_all(
        client_channel,
        await run_job(
            vision_worker,
            client_channel.seal_request(
                protocol.validate_request(messages=asking(RED), sampling_params=GREEDY)
            ),
        ),
    )
    assert "".join(item.text for item in served) == await truth(vision_engine, asking(RED))


async def test_tenants_never_share_an_images_cache_entries(vision_worker):
    """vLLM keys its processed-image cache and the image's prefix-cache
    blocks by the name the worker gives each image: a hash of its bytes
    under the key's cache salt."""
    request = protocol.validate_request(messages=asking(RED), sampling_params=GREEDY)

    async def names(cache_salt: str) -> list[str]:
        plan = await vision_worker.planner.plan(request, cache_salt)
        return plan.engine_input["mm_hashes"]["image"]

    first, again, other = await names("tenant-a"), await names("tenant-a"), await names("tenant-b")
    assert first == again and first != other


async def test_a_text_only_model_refuses_images(worker, client_channel):
    """The session's worker serves the tiny text model."""
    outputs = await run_job(
        worker,
        client_channel.seal_request(
            protocol.validate_request(messages=asking(RED), sampling_params=GREEDY)
        ),
    )
    assert only_error(outputs).reason == images.NO_IMAGES
    card = open_all(
        client_channel,
        await run_job(
            worker, client_channel.seal_request(protocol.validate_request(describe=True))
        ),
    )[0].card
    assert card.images == 0


@pytest.fixture(scope="module")
def vision_gateway(vision_live, tmp_path_factory):
    """The gateway as a process, in front of the vision worker (the
    anthropic SDK takes no httpx client of the in-process gateway's kind)."""
    process = in_front_of(vision_live, tmp_path_factory.mktemp("vision-gateway"))
    yield process
    process.stop()


async def test_the_gateway_passes_images_from_each_api(vision_live, vision_engine, vision_gateway):
    """The same question and image through OpenAI's chat completions and
    Responses API (the gateway in process) and Anthropic's Messages API
    (the gateway's process), each SDK unmodified."""
    expected = await truth(vision_engine, asking(RED))
    gateway = {
        "base_url": vision_live.serving.url,
        "api_key": vision_live.endpoint.api_key,
        "encryption_key": vision_live.key,
    }
    red_url = data_url(RED)
    async with encrypted_vllm.AsyncOpenAI(**gateway) as llm:
        (model,) = [each.id async for each in llm.models.list()]
        chat = await llm.chat.completions.create(
            model=model,
            messages=asking(RED),
            temperature=0,
            max_tokens=GREEDY["max_tokens"],
            extra_body={"ignore_eos": True},
        )
        response = await llm.responses.create(
            model=model,
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": QUESTION},
                        {"type": "input_image", "image_url": red_url, "detail": "auto"},
                    ],
                }
            ],
            temperature=0,
            max_output_tokens=GREEDY["max_tokens"],
            extra_body={"ignore_eos": True},
        )
    assert chat.choices[0].message.content == expected
    assert response.output_text == expected
    async with anthropic.AsyncAnthropic(
        api_key="unused", base_url=vision_gateway.origin, max_retries=0, timeout=120
    ) as claude:
        answer = await claude.messages.create(
            model=model,
            max_tokens=GREEDY["max_tokens"],
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": QUESTION},
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": base64.b64encode(RED).decode(),
                            },
                        },
                    ],
                }
            ],
            extra_body={"temperature": 0},  # Anthropic's API has no ignore_eos
        )
    assert answer.content[0].text == await truth(vision_engine, asking(RED), ignore_eos=False)
