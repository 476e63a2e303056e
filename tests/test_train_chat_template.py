"""Chat templates for base models without one, as TRL's recipes set them."""
from __future__ import annotations


from moaa.trainer.chat_template import ensure_chat_template

MSGS = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


def _tiny_gemma3(tok):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    return Gemma3ForCausalLM(cfg)


def test_gemma3_base_gets_trls_gemma3_template():
    """Gemma-3-270M is a base model with <start_of_turn>/<end_of_turn> in its vocabulary but no template."""
    from moaa.services.local.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = None
    model = _tiny_gemma3(tok)
    vocab_before = model.get_input_embeddings().weight.shape[0]
    note = ensure_chat_template(model, tok)
    assert note == "set from trl/chat_templates/gemma3.jinja"
    text = tok.apply_chat_template(MSGS, tokenize=False)
    assert "<start_of_turn>user\nHi?<end_of_turn>" in text and "<start_of_turn>model\nHello.<end_of_turn>" in text
    assert tok.eos_token == "<end_of_turn>" and model.generation_config.eos_token_id == tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == vocab_before  # no new tokens were needed


def test_unknown_base_gets_chatml_with_tokens_added():
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1, "hello": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=3, n_embd=32, n_layer=1, n_head=2))
    note = ensure_chat_template(model, tok)
    assert note == "set to ChatML (2 token(s) added)"
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert tok.apply_chat_template(MSGS, tokenize=False).startswith("<|im_start|>user\nHi?<|im_end|>")


def test_model_with_a_template_is_left_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = tok.chat_template
    assert ensure_chat_template(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok) == "model's own"
    assert tok.chat_template == before


def test_template_file_wins(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert ensure_chat_template(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, str(path)).startswith("set from")
    assert tok.apply_chat_template(MSGS, tokenize=False) == "[user] Hi?\n[assistant] Hello.\n"
