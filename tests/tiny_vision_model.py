"""A tiny random-weight vision-language model (Idefics3) with its own
tokenizer and image processor, built on the fly for the tests of images.

Like `encrypted_vllm.dev.tiny_model`, it loads in the real vLLM engine on
a CPU with no model hub; its text is gibberish, its greedy output
deterministic, and an image changes it (the tests check both).

Rules:
- Idefics3 (a SigLIP-like vision tower, a pixel-shuffle connector and a
  Llama) is the architecture: vLLM 0.32's modules of LLaVA, Qwen2-VL,
  Gemma 3 and most others import torchvision, which has no CPU build on the
  package registry beside the CPU torch; Idefics3's needs none, and
  transformers processes its images with Pillow.
- Images are resized to 56x56 pixels, 16 patches of 14, which the
  connector folds into 4 `<image>` tokens a picture (no tiling).
- The chat template writes `<image>` where a message's image part was;
  vLLM's Idefics3 processor wraps and expands it. The markers are special
  tokens, never printed.
- `build(directory)` is deterministic for a seed and idempotent, as
  `tiny_model.build` is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the recipe below changes, so stale cached builds are not reused.
RECIPE_VERSION = 1
IMAGE_SIZE = 56
PATCH_SIZE = 14
SCALE_FACTOR = 2  # the connector's pixel shuffle: 2x2 patches a token
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

IMAGE_TOKEN = "<image>"
# Idefics3's processor finds its markers by these names.
MARKERS = ["<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>"]

# Rendered by vLLM with the "openai" content format (the template iterates
# over content parts), so every image part arrives as {"type": "image"}.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    '<|{{ message["role"] }}|>{{ "\\n" }}'
    '{% if message["content"] is string %}{{ message["content"] }}'
    '{% elif message["content"] %}{% for part in message["content"] %}'
    '{% if part["type"] == "text" %}{{ part["text"] }}'
    '{% elif part["type"] == "image" %}<image>{% endif %}'
    "{% endfor %}{% endif %}"
    '{{ "\\n" }}'
    "{% endfor %}"
    '{% if add_generation_prompt %}<|assistant|>{{ "\\n" }}{% endif %}'
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the encrypted worker "
    "streams every token back to its client: sanity check passed.",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789",
    "!\"#$%&'()*+,-./:;=?@[\\]^_`{|}~\n",
]


def build(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Build the model into `directory` (unless already built) and return it."""
    target = Path(directory)
    stamp = target / "tiny_vision_model.json"
    wanted = {"recipe": RECIPE_VERSION, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed, so a killed build is never reused.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-vision-model-", dir=target.parent))
    _write(staging, seed)
    (staging / stamp.name).write_text(json.dumps(wanted))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def _write(directory: Path, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"], show_progress=False
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    bpe.add_special_tokens([*MARKERS, "<|system|>", "<|user|>", "<|assistant|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    Idefics3Processor(
        image_processor=images,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_TOKENS,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(directory)

    vision = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,  # head_dim 64, as for the text model
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        initializer_range=0.5,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM's CPU attention rejects 16
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        # As in tiny_model: varied greedy text, which an image then changes.
        initializer_range=0.5,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=SCALE_FACTOR,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    config.initializer_range = 0.5  # the connector's weights, drawn from the config's
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(directory)
