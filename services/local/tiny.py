"""A tiny random-initialised chat model, built offline, for fast tests.

It loads with the same code as a real model (a Hugging Face folder: config, safetensors, tokenizer
with a chat template). Attention head size is 32 because vLLM's CPU kernels reject 16.
"""
from __future__ import annotations

from pathlib import Path

# SmolLM2's ChatML template, so tiny and real models format conversations the same way.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

# A small varied corpus so the byte-level BPE learns real merges; the weights stay random.
_CORPUS = [
    "The capital of France is Paris.", "Write a short poem about the sea.",
    "You are a helpful assistant.", "Explain how photosynthesis works in simple terms.",
    "def add(a, b):\n    return a + b", "1 2 3 4 5 6 7 8 9 10 100 1000",
    "Rate each response on a scale from 1 to 10 and explain why.", "Score: 7/10",
    "Combine the answers below into one better answer.", "Hello! How can I help you today?",
    "Translate 'good morning' into German: Guten Morgen.", "Lists: first, second, third.",
]


def build_tokenizer(vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, *, hidden_size: int = 64, layers: int = 2, heads: int = 2,
                     vocab_size: int = 1000, max_positions: int = 2048, seed: int = 0) -> Path:
    """Write a tiny Llama-architecture chat model to `out_dir` and return the folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    head_dim = 32
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    if hidden_size != heads * head_dim:
        raise ValueError(f"hidden_size must be heads * 32 = {heads * head_dim}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # never the argmax: a random model's greedy answers are otherwise blank lines
        model.get_input_embeddings().weight[_invisible_ids(tokenizer)] = 0.0
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _invisible_ids(tokenizer) -> list[int]:
    """Tokens that print nothing: special ones other than end-of-turn, and whitespace. With tied
    embeddings a zero row gives them logit 0, below the best of the random others, so even greedy
    decoding writes visible (random) words."""
    keep = tokenizer.eos_token_id
    return [i for i in range(len(tokenizer)) if i != keep and not tokenizer.decode([i]).strip()]
