"""A chat template for base models that ship without one (Gemma-3-270M is one).

TRL's recipes do the same: clone a template (`trl.clone_chat_template`) or use one of the jinja files
TRL ships, add the turn tokens the template needs, point EOS at the end-of-turn token and resize the
embeddings. Without a hub we take the template from a file: the model family's own file among TRL's
templates when its turn tokens are already in the vocabulary (Gemma), ChatML otherwise.
"""
from __future__ import annotations

from pathlib import Path

# the answer and its end-of-turn token inside {% generation %} markers: TRL's assistant_only_loss needs them
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# model_type -> (TRL template file, end-of-turn token that must already be in the vocabulary)
_FAMILY_TEMPLATES = {
    "gemma3_text": ("gemma3.jinja", "<end_of_turn>"),
    "gemma3": ("gemma3.jinja", "<end_of_turn>"),
    "gemma2": ("gemma.jinja", "<end_of_turn>"),
    "gemma": ("gemma.jinja", "<end_of_turn>"),
}


def _trl_template(name: str) -> str | None:
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / name
    return path.read_text() if path.is_file() else None


def _set_eos(model, tokenizer, eos: str) -> None:
    tokenizer.eos_token = eos
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos


def ensure_chat_template(model, tokenizer, template_file: str | None = None) -> str:
    """Give the tokenizer a chat template when it has none; returns what was done (for the manifest)."""
    if template_file:
        tokenizer.chat_template = Path(template_file).read_text()
        return f"set from {template_file}"
    if tokenizer.chat_template:
        return "model's own"
    family = _FAMILY_TEMPLATES.get(getattr(model.config, "model_type", ""))
    if family:
        text = _trl_template(family[0])
        if text and family[1] in tokenizer.get_vocab():
            tokenizer.chat_template = text
            _set_eos(model, tokenizer, family[1])
            return f"set from trl/chat_templates/{family[0]}"
    # ChatML with its two turn tokens added, as TRL's clone_chat_template does for a ChatML source.
    added = tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    if added:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    _set_eos(model, tokenizer, "<|im_end|>")
    return f"set to ChatML ({added} token(s) added)"
