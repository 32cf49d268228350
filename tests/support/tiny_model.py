"""A tiny random-weight llama-architecture GGUF, written by the tests themselves.

No model hub is reachable from CI and binaries stay out of git, so the engine's model is
generated: 64 embedding dims, 4 heads, 2 blocks, ~300 tokens (0.5 MB, a fraction of a
second). Its answers are nonsense; tests assert on shapes, never on text.

    python -m tests.support.tiny_model /tmp/tiny.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

SEED = 20240601
EMBD, HEADS, BLOCKS, FF, CTX = 64, 4, 2, 128, 2048
CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML, so the server formats chats from the file itself (no --chat_format needed).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A few merges (llama.cpp refuses a gpt2 tokenizer without any); each merged token must
# be in the vocabulary, and a later merge may use an earlier one.
MERGES = (
    "Ġ t", "h e", "i n", "e r", "a n", "o n", "r e", "Ġ a", "e n", "o r", "Ġ s", "Ġ w",
    "a t", "e s", "i s", "o u", "i t", "Ġ c", "Ġ o", "Ġ b", "l l", "Ġ f", "Ġ m", "Ġ p",
    "Ġ d", "Ġ h", "a r", "a l", "n d", "n g", "i ng", "Ġt he", "Ġa nd", "Ġ in", "Ġ is", "Ġ it",
    "Ġ th", "e d", "l e", "o m", "Ġ l",
)  # fmt: skip


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: every byte is a token, so any text tokenizes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    """Byte tokens, merged tokens, then the ChatML control tokens (with their types)."""
    tokens = byte_symbols()
    for merge in MERGES:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    tokens += CONTROL
    types += [int(gguf.TokenType.CONTROL)] * len(CONTROL)
    return tokens, types


def write_tiny_gguf(
    path: Path,
    *,
    embd: int = EMBD,
    heads: int = HEADS,
    blocks: int = BLOCKS,
    ff: int = FF,
    ctx: int = CTX,
) -> Path:
    """Write the model to `path` (deterministic: same seed and sizes, same bytes) and
    return it. Larger sizes make prefill cost visible on a CPU (bench/serving.py)."""
    EMBD, HEADS, BLOCKS, FF, CTX = embd, heads, blocks, ff, ctx  # noqa: N806 - the file's names
    tokens, types = vocabulary()
    vocab = len(tokens)
    head_dim = EMBD // HEADS
    rng = np.random.default_rng(SEED)

    def rand(rows: int, cols: int) -> np.ndarray:
        # numpy shape is (rows, cols): the reverse of ggml's order.
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fabric-tiny-random")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_vocab_size(vocab)
    w.add_context_length(CTX)
    w.add_embedding_length(EMBD)
    w.add_block_count(BLOCKS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(head_dim)  # llama.cpp: "invalid n_rot" otherwise
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(MERGES))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_tensor("token_embd.weight", rand(vocab, EMBD))
    w.add_tensor("output_norm.weight", ones(EMBD))
    w.add_tensor("output.weight", rand(vocab, EMBD))
    for n in range(BLOCKS):
        w.add_tensor(f"blk.{n}.attn_norm.weight", ones(EMBD))
        w.add_tensor(f"blk.{n}.attn_q.weight", rand(HEADS * head_dim, EMBD))
        w.add_tensor(f"blk.{n}.attn_k.weight", rand(HEADS * head_dim, EMBD))
        w.add_tensor(f"blk.{n}.attn_v.weight", rand(HEADS * head_dim, EMBD))
        w.add_tensor(f"blk.{n}.attn_output.weight", rand(EMBD, HEADS * head_dim))
        w.add_tensor(f"blk.{n}.ffn_norm.weight", ones(EMBD))
        w.add_tensor(f"blk.{n}.ffn_gate.weight", rand(FF, EMBD))
        w.add_tensor(f"blk.{n}.ffn_up.weight", rand(FF, EMBD))
        w.add_tensor(f"blk.{n}.ffn_down.weight", rand(EMBD, FF))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    print(write_tiny_gguf(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")))
