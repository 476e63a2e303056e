"""A tiny random-initialised chat model, built offline, for fast tests.

It loads with the same code as a real model (a Hugging Face folder: config, safetensors, tokenizer
with a chat template). Attention head size is 32 because vLLM's CPU kernels reject 16.

The verdict variant (`verdict=True`) can judge: a random model writes random words, so every pairwise
verdict abstains and a pipeline stops at stage 2 with no pairs. This one has "[[A]]" and "[[B]]" as
tokens and an output head that scores them +h.v and -h.v (h: the last hidden state) and every other
token 0, so max(h.v, -h.v) >= 0 wins greedy decoding: a judge at temperature 0 writes only verdicts,
which depend on the prompt and the order of its answers (`_verdict_head`); sampled replies still mix
in other tokens, so a prompt's samples differ. It loads and trains like the plain one.
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
# The two verdicts the annotator parses (services/annotator/parsing.py), one token each in the verdict variant.
VERDICT_TOKENS = ("[[A]]", "[[B]]")

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
                     vocab_size: int = 1000, max_positions: int = 2048, seed: int = 0,
                     verdict: bool = False) -> Path:
    """Write a tiny Llama-architecture chat model to `out_dir` and return the folder; `verdict=True`:
    the variant that judges (module docstring)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    if verdict:  # plain added tokens: decoded like text, so the reply reads "[[A]][[B]]..."
        tokenizer.add_tokens(list(VERDICT_TOKENS))
    head_dim = 32
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=not verdict,
    )
    if hidden_size != heads * head_dim:
        raise ValueError(f"hidden_size must be heads * 32 = {heads * head_dim}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # never the argmax: a random model's greedy answers are otherwise blank lines
        model.get_input_embeddings().weight[_invisible_ids(tokenizer)] = 0.0
        if verdict:
            _verdict_head(model, tokenizer)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _verdict_head(model, tokenizer, per_template: int = 48) -> None:
    """Output rows +v for "[[A]]", -v for "[[B]]", 0 elsewhere: one of the two is always the argmax.

    Which one must depend on the prompt, and on the order of its two answers, or both orders give the
    same letter, every pair ties and no prompt yields a preference pair. A plain random model is too
    smooth for that: its last hidden state is nearly an average of the prompt's tokens, the same in both
    orders and mostly the same for every prompt (a random v gave "[[B]]" to 76 of 80 judge prompts). So
    - attention is made sharp (queries and keys x16): a prompt's hidden state then depends on which
      tokens sit where, so swapping the answers changes the verdict often enough (measured: for 18 of
      64 answer pairs a judge named the same answer in both orders, i.e. preferred it);
    - v is orthogonal to the 8 leading directions of the hidden states of the annotator's pairwise
      templates filled with random questions and random-token answers: what is common to all prompts
      lives there, and left in, it made one letter win nearly always;
    - the verdicts' input embeddings are zero: a verdict written adds nothing to the context, so the
      next ones (the annotator reads the last) follow the prompt, not the previous letter.
    """
    import random

    import torch

    from moaa.services.annotator.templates import TemplateStore

    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(16.0)
        layer.self_attn.k_proj.weight.mul_(16.0)
    ids_ab = tokenizer.convert_tokens_to_ids(list(VERDICT_TOKENS))
    model.get_input_embeddings().weight[ids_ab] = 0.0
    rng = random.Random(0)
    words = [x for text in _CORPUS for x in text.split()]
    plain = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids and i not in ids_ab]

    def question() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))

    def answer() -> str:  # what a random model samples: any token, a verdict now and then
        n = rng.randint(4, 24)
        return tokenizer.decode([rng.choice(plain if rng.random() < 0.85 else ids_ab) for _ in range(n)])

    store = TemplateStore()
    states = []
    for tpl in (store.get(n) for n in store.names()):
        if tpl.kind != "pairwise":
            continue
        for _ in range(per_template):
            messages = tpl.render(instruction=question(), answer_a=answer(), answer_b=answer())
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            ids = [*ids, *[ids_ab[0]] * rng.randint(0, 15)]
            states.append(model.model(torch.tensor([ids])).last_hidden_state[0, -1])
    h = torch.stack(states)
    common = torch.linalg.svd(h, full_matrices=False).Vh[:8].T
    v = torch.randn(h.shape[1])
    v = v - common @ (common.T @ v)
    v = v * (2.0 / (h @ v).abs().mean())   # |h.v| ~ 2: greedy writes verdicts, sampling mostly other tokens
    head = model.get_output_embeddings().weight
    head.zero_()
    head[ids_ab[0]], head[ids_ab[1]] = v, -v


def _invisible_ids(tokenizer) -> list[int]:
    """Tokens that print nothing: special ones other than end-of-turn, and whitespace. With tied
    embeddings a zero row gives them logit 0, below the best of the random others, so even greedy
    decoding writes visible (random) words."""
    keep = tokenizer.eos_token_id
    return [i for i in range(len(tokenizer)) if i != keep and not tokenizer.decode([i]).strip()]
