"""Tiny offline tokenizer and models shared by the tests (no hub access).

The tokenizer is a byte-level BPE trained on a small fixed corpus, so every string
round-trips (newlines, '#', digits) and piecewise tokenization of a sample equals
tokenization of the whole text, as DESIGN §1 requires of real GPT-2 tokenizers.
"""

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from preprocessing.tiny_model import train_tokenizer

CORPUS = [
    "Every wumpus is a yumpus. Every yumpus is a rempus. Tom is a wumpus.",
    "Is Tom a rempus or a gorpus? Tom is a rempus.",
    "Alex is a lempus. Every lempus is a zumpus. Sally is a brimpus. << >>",
    "### 12 + 30 = 42 <<3*4=12>> <<12+30=42>> #### 42",
    "question answer steps\n\n1 2 3 4 5 6 7 8 9 0",
]


def make_tokenizer(corpus=CORPUS, vocab_size=400):
    """A GPT-2 style byte-level BPE tokenizer with EOS as BOS/EOS, no pad token."""
    return train_tokenizer(corpus, vocab_size)


def make_gpt2(vocab_size, seed=0, n_layer=2, n_embd=64, **kw):
    import torch

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, n_layer=n_layer, n_embd=n_embd, n_head=4, n_positions=512, **kw)
    return GPT2LMHeadModel(cfg).eval()


def make_llama(vocab_size, seed=0, **kw):
    import torch

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return LlamaForCausalLM(cfg).eval()


def make_qwen3(vocab_size, seed=0):
    """Qwen3: biases off, RMS-normed queries and keys, grouped-query attention."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Qwen3ForCausalLM(cfg).eval()
