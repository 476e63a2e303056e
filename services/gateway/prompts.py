"""Pure functions that build the messages each MoA agent receives.

Layer 1 proposers answer the conversation as it is. Every later agent (next layer's proposers, the
aggregator) gets the previous layer's answers, numbered, inside its system prompt after the
aggregate-and-synthesize instruction (MoA, Wang et al. 2024; our own wording). An existing system
message is kept and the instruction appended to it. References are rebuilt per turn and never enter
the conversation history: earlier assistant turns are the MoA's own final answers.
"""
from __future__ import annotations

AGGREGATE_INSTRUCTION = (
    "You have been given several answers to the user's latest message, written by different AI models. "
    "Your task is to combine them into one answer of the highest quality. Judge them critically: some of "
    "them may be wrong, incomplete or biased. Do not simply copy any of them; take what is correct and "
    "useful from each, fix their mistakes, and write a single reply that is accurate, complete and "
    "well organised, as your own answer to the user.\n\n"
    "Answers from the models:"
)


def format_references(references: list[str]) -> str:
    """References numbered from 1, each on its own block."""
    return "\n\n".join(f"{i}. {text.strip()}" for i, text in enumerate(references, 1))


def aggregate_system_block(references: list[str], instruction: str | None = None) -> str:
    return f"{instruction or AGGREGATE_INSTRUCTION}\n\n{format_references(references)}"


def split_system(conversation: list[dict]) -> tuple[str | None, list[dict]]:
    """(the conversation's system message or None, the other turns)."""
    if conversation and conversation[0]["role"] == "system":
        return conversation[0]["content"], conversation[1:]
    return None, list(conversation)


def build_messages(conversation: list[dict], agent_system: str | None = None,
                   references: list[str] | None = None, instruction: str | None = None) -> list[dict]:
    """The messages one agent receives.

    System prompt = the agent's own system prompt (from the recipe), then the conversation's system
    message, then (when there are references) the instruction and the numbered references.
    """
    conv_system, turns = split_system(conversation)
    parts = [p for p in (agent_system, conv_system) if p]
    if references:
        parts.append(aggregate_system_block(references, instruction))
    out = [{"role": "system", "content": "\n\n".join(parts)}] if parts else []
    return out + [dict(t) for t in turns]
