"""A tiny Hugging Face model directory (Qwen2 architecture), written by the tests themselves.

`transformers serve` loads models the Hugging Face way (config.json, safetensors weights,
tokenizer.json, a chat template); no model hub is reachable here and binaries stay out of
git, so the suite writes one: 64 hidden dims, 2 layers, 303 tokens, 0.5 MB, in a
fraction of a second, with numpy and the standard library only (the project's venv has
neither torch nor transformers). Same seed, same bytes.

Random weights, so answers are nonsense, with one scripted path, so that tool calling can
be proved end to end: when a request offers tools (and the last message is not a tool
result), the chat template opens the answer with `<tool_call>` (a prefill, as Qwen 3.5's
template opens `<think>`), and the weights then continue, greedily and whatever came
before, with one call of get_weather (`TOOL_CALL`), `</tool_call>` and `<|im_end|>`. The
architecture is Qwen2 because `transformers serve` parses tool calls of that model type
(`<tool_call>{json}</tool_call>`) without a response template in the tokenizer.

How the weights carry the script: the last hidden dimensions are reserved, one per
scripted token (`<tool_call>`, the call, `</tool_call>`). Each of those tokens' embedding
lies along its own reserved dimension, every other embedding and every
block's output projection leave the reserved dimensions at zero, and the lm_head row of
each scripted successor reads only its predecessor's dimension (scaled). So after a
scripted token its successor leads by a wide margin, and after any other token the
scripted rows score exactly 0 and never win (both checked when the model is written).

    python -m tests.support.tiny_hf_model /tmp/tiny-hf     # prints the directory
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

from tests.support.tiny_model import MERGES, byte_symbols

SEED = 20260101
HIDDEN, HEADS, KV_HEADS, LAYERS, FF, CTX = 64, 4, 2, 2, 128, 2048
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # control tokens, as Qwen2's
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"  # added, not special (as Qwen2's)
TOOL_NAME = "get_weather"
TOOL_ARGUMENTS = {"city": "Paris", "unit": "c"}
# One added token: the whole call, so the script is three tokens long.
TOOL_CALL = json.dumps({"name": TOOL_NAME, "arguments": TOOL_ARGUMENTS})
# Greedy decoding follows the script: each token's successor.
SCRIPT = {TOOL_OPEN: TOOL_CALL, TOOL_CALL: TOOL_CLOSE, TOOL_CLOSE: "<|im_end|>"}
SCRIPT_GAIN = 10.0  # a scripted successor's logit: GAIN * sqrt(HIDDEN)
MIN_MARGIN = 20.0  # checked: the scripted successor beats every other token by this much

# Qwen2.5's ChatML template in short (system, tools, assistant tool calls, tool results),
# plus the prefill: with tools offered and no tool result to answer, the answer opens with
# <tool_call>.
CHAT_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": \
{% if call.function.arguments is string %}{{ call.function.arguments }}\
{% else %}{{ call.function.arguments | tojson }}{% endif %}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if tools and messages[-1].role != 'tool' %}<tool_call>{% endif %}
{%- endif %}"""


def vocabulary() -> tuple[dict[str, int], list[str], list[str]]:
    """(BPE vocabulary, its merges, added tokens in id order after it)."""
    tokens, merges = byte_symbols(), []
    for merge in MERGES:  # the GGUF's merges whose two parts are tokens (BPE needs them)
        left, right = merge.split(" ")
        if left in tokens and right in tokens:
            merges.append(merge)
            if left + right not in tokens:
                tokens.append(left + right)
    added = [*SPECIAL, TOOL_OPEN, TOOL_CLOSE, TOOL_CALL]
    return {t: i for i, t in enumerate(tokens)}, merges, added


def tokenizer_json(vocab: dict[str, int], merges: list[str], added: list[str]) -> dict[str, object]:
    """A byte-level BPE tokenizer as the `tokenizers` library serialises one (GPT-2's)."""
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": len(vocab) + i,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": token in SPECIAL,
            }
            for i, token in enumerate(added)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ") for m in merges],
        },
    }


def weights(ids: dict[str, int], vocab_size: int) -> dict[str, np.ndarray]:
    """Qwen2ForCausalLM's tensors, by their names in transformers' state dict."""
    rng = np.random.default_rng(SEED)
    head_dim = HIDDEN // HEADS
    free = HIDDEN - len(SCRIPT)  # dimensions [free, HIDDEN) are the script's

    def rand(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def writes_free_only(matrix: np.ndarray) -> np.ndarray:
        matrix[free:] = 0  # an output projection's rows are residual dimensions
        return matrix

    embed = rand(vocab_size, HIDDEN, scale=1.0)
    lm_head = rand(vocab_size, HIDDEN, scale=0.3)
    embed[:, free:] = 0
    lm_head[:, free:] = 0
    for k, (token, successor) in enumerate(SCRIPT.items()):
        embed[ids[token]] = 0
        embed[ids[token], free + k] = np.sqrt(HIDDEN)  # rms 1, as the others
        lm_head[ids[successor]] = 0
        lm_head[ids[successor], free + k] = SCRIPT_GAIN
    out = {"model.embed_tokens.weight": embed, "lm_head.weight": lm_head}
    out["model.norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    for n in range(LAYERS):
        p = f"model.layers.{n}"
        out |= {
            f"{p}.input_layernorm.weight": np.ones(HIDDEN, dtype=np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(HIDDEN, dtype=np.float32),
            f"{p}.self_attn.q_proj.weight": rand(HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.q_proj.bias": rand(HEADS * head_dim),
            f"{p}.self_attn.k_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.k_proj.bias": rand(KV_HEADS * head_dim),
            f"{p}.self_attn.v_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.v_proj.bias": rand(KV_HEADS * head_dim),
            f"{p}.self_attn.o_proj.weight": writes_free_only(rand(HIDDEN, HEADS * head_dim)),
            f"{p}.mlp.gate_proj.weight": rand(FF, HIDDEN),
            f"{p}.mlp.up_proj.weight": rand(FF, HIDDEN),
            f"{p}.mlp.down_proj.weight": writes_free_only(rand(HIDDEN, FF)),
        }
    return out


def script_margins(tensors: dict[str, np.ndarray], ids: dict[str, int]) -> dict[str, float]:
    """For each scripted token, how far its successor's logit leads the runner-up, on the
    embedding alone (the blocks write only the other dimensions: they move the runner-up
    by a few units at most). Refuses a model where a token outside the script would lead
    into it."""
    embed, lm_head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    normed = embed / np.sqrt((embed**2).mean(axis=1, keepdims=True))
    logits = normed @ lm_head.T
    margins = {}
    for token, successor in SCRIPT.items():
        row = logits[ids[token]].copy()
        best = row[ids[successor]]
        row[ids[successor]] = -np.inf
        margins[token] = float(best - row.max())
    scripted = {ids[s] for s in SCRIPT.values()}
    for i in set(range(len(embed))) - {ids[t] for t in SCRIPT}:
        if int(logits[i].argmax()) in scripted:
            raise ValueError(f"token {i} would lead into the tool-call script")
    return margins


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """The safetensors format: a little-endian u64 header size, a JSON header (padded to 8
    bytes), then each tensor's raw little-endian bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def write_tiny_hf_model(directory: Path) -> Path:
    """Write the model directory (deterministic) and return it."""
    vocab, merges, added = vocabulary()
    ids = {**vocab, **{t: len(vocab) + i for i, t in enumerate(added)}}
    vocab_size = len(ids)
    tensors = weights(ids, vocab_size)
    margins = script_margins(tensors, ids)
    if min(margins.values()) < MIN_MARGIN:
        raise ValueError(f"tool-call script too weak: {margins}")
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": FF,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": CTX,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": eos,
        "pad_token_id": ids["<|endoftext|>"],
        "torch_dtype": "float32",
    }
    generation = {
        "do_sample": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": eos,
        "pad_token_id": ids["<|endoftext|>"],
    }
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": CTX,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": config,
        "generation_config.json": generation,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "tokenizer.json": tokenizer_json(vocab, merges, added),
    }
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    (directory / "model.safetensors").write_bytes(safetensors_bytes(tensors))
    return directory


if __name__ == "__main__":
    print(write_tiny_hf_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-hf")))
