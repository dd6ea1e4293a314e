"""A tiny random-weight Llama with its own tokenizer, built on the fly.

It is the offline default model: tests and `test_local.py` load it with the
real vLLM engine on a CPU, with no model hub and no GPU. Its weights are
random, so its text is gibberish by design; greedy (temperature 0) output is
still deterministic, which is what the tests compare against.

Rules:
- `build(directory)` is deterministic for a given seed and idempotent: a
  directory that already holds a complete build is reused as is.
- The shape is the smallest that vLLM's CPU attention accepts (head_dim 64).
- It has what the tests of tools and reasoning need, in the formats vLLM's
  parsers read: a chat template that renders tools, tool calls and tool
  results as Hermes/Qwen models do (`<tools>`, `<tool_call>`), the
  `<think>`, `</think>`, `<tool_call>` and `</tool_call>` markers as single
  tokens, and byte-level pieces of CJK characters and emoji that split them
  across tokens (so streaming must join bytes into whole characters).
- `build_adapter` makes a random LoRA adapter for it, for the tests of
  LORA_MODULES.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# Bump when the recipe below changes, so stale cached builds are not reused.
RECIPE_VERSION = 2

# Rendered with trim_blocks, as transformers renders every chat template:
# a newline right after a block tag is dropped, hence the {{ "\\n" }}.
CHAT_TEMPLATE = (
    '{% if tools %}<|system|>{{ "\\n" }}<tools>{{ "\\n" }}'
    '{% for tool in tools %}{{ tool | tojson }}{{ "\\n" }}{% endfor %}'
    '</tools>{{ "\\n" }}{% endif %}'
    "{% for message in messages %}"
    '<|{{ message["role"] }}|>{{ "\\n" }}'
    '{% if message["content"] is string %}{{ message["content"] }}'
    '{% elif message["content"] %}{% for part in message["content"] %}{{ part["text"] }}'
    '{% endfor %}{% endif %}{{ "\\n" }}'
    '{% for call in message["tool_calls"] or [] %}<tool_call>{{ "\\n" }}'
    '{"name": {{ call["function"]["name"] | tojson }}, '
    '"arguments": {{ call["function"]["arguments"] | tojson }}}{{ "\\n" }}'
    '</tool_call>{{ "\\n" }}{% endfor %}'
    "{% endfor %}"
    '{% if add_generation_prompt %}<|assistant|>{{ "\\n" }}{% endif %}'
)
# Markers of vLLM's hermes tool parser and of its <think> reasoning parsers.
MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

# The vocabulary holds only what this corpus contains (printable ASCII, and
# the bytes of a few CJK characters and emoji), so even random weights print
# as harmless words; other input maps to <unk>. The vocabulary is too small
# to merge every multi-byte character into one token. It lacks "<" and ">":
# as in real reasoning and tool-calling models, the markers are written only
# as their own tokens, which is what vLLM's token-based parsers look for.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the encrypted worker "
    "streams every token back to its client: sanity check passed.",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789",
    "!\"#$%&'()*+,-./:;=?@[\\]^_`{|}~\n",
    "日本語のテキスト 中文 한국어 🎉🔒✨",
]


def default_directory() -> Path:
    """Where `test_local.py` keeps its offline build between runs."""
    from encrypted_vllm.dev.real_model import default_cache_root

    return default_cache_root() / f"tiny-llama-v{RECIPE_VERSION}"


def build(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Build the model into `directory` (unless already built) and return it."""
    target = Path(directory)
    stamp = target / "tiny_model.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == _stamp(seed):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a killed build is never reused.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=target.parent))
    _write_tokenizer(staging)
    _write_model(staging, seed)
    (staging / "tiny_model.json").write_text(json.dumps(_stamp(seed)))
    if target.exists():
        _remove_tree(target)
    staging.rename(target)
    return target


def _stamp(seed: int) -> dict:
    return {"recipe": RECIPE_VERSION, "seed": seed}


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<unk>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer.add_tokens(MARKERS)  # single tokens, not special: parsers read them as text
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )
    wrapped.save_pretrained(directory)


def _write_model(directory: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # Far above the usual 0.02: near-uniform logits make greedy output
        # repeat one token, and varied text makes lost or reordered deltas
        # visible in the tests.
        initializer_range=0.5,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)


def build_adapter(base: str | os.PathLike, directory: str | os.PathLike, seed: int = 1) -> Path:
    """A random LoRA adapter of rank 8 for the model in `base`, on every
    projection of its layers, made and saved with peft (a test dependency),
    into `directory` unless already there. Its weights are random on both
    sides (peft's `init_lora_weights=False`): an adapter initialised as for
    training changes nothing, and the tests need one whose output differs."""
    target = Path(directory)
    stamp = target / "tiny_adapter.json"
    wanted = {"recipe": RECIPE_VERSION, "seed": seed, "base": str(base)}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return target
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    adapter = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        init_lora_weights=False,
    )
    get_peft_model(model, adapter).save_pretrained(target)
    stamp.write_text(json.dumps(wanted))
    return target


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


if __name__ == "__main__":
    print(build(default_directory()))
