"""Turning a GenerateRequest into a checked plan: recipe, agents with their sampling, straggler settings.

Every problem becomes InvalidArgument with a message that says what to change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from moaa.services.backend.config import nth_seed
from moaa.services.common.errors import InvalidArgument
from moaa.services.common.validation import check_max_tokens, merge_sampling, messages_to_dicts, sampling_overrides
from moaa.services.config import MoaaConfig, RecipeConfig, SamplingConfig


@dataclass
class Agent:
    model: str
    system_prompt: str | None
    sampling: SamplingConfig


@dataclass
class Plan:
    request_id: str
    recipe_name: str
    recipe: RecipeConfig
    conversation: list[dict]
    proposers: list[Agent]
    aggregator: Agent
    layers: int
    min_proposers: int
    first_k: int | None
    layer_deadline_s: float | None
    metadata: dict[str, str] = field(default_factory=dict)


def resolve_recipe(cfg: MoaaConfig, name: str) -> tuple[str, RecipeConfig]:
    try:
        return cfg.recipe(name or None)
    except KeyError as err:
        hint = "" if name else " (set default_recipe in the config or name a recipe)"
        raise InvalidArgument(f"{err.args[0]}{hint}") from None


def _own_seed(over: dict, i: int) -> dict:
    """A request's proposer seed, made the i-th proposer's own: proposers that share a model and sampling still
    answer differently, and the same seed gives the same answers."""
    return {**over, "seed": nth_seed(over["seed"], i)} if "seed" in over else over


def make_plan(cfg: MoaaConfig, req, request_id: str, max_prompt_chars: int) -> Plan:
    """Validate `req` (a gateway_pb2.GenerateRequest) against the config."""
    conversation = messages_to_dicts(req.messages, max_chars=max_prompt_chars, ends_with_user=False)
    recipe_name, recipe = resolve_recipe(cfg, req.recipe)
    prop_over = sampling_overrides(req.proposer_sampling if req.HasField("proposer_sampling") else None,
                                   field="proposer_sampling")
    agg_over = sampling_overrides(req.aggregator_sampling if req.HasField("aggregator_sampling") else None,
                                  field="aggregator_sampling")
    n = len(recipe.proposers)
    min_p = req.min_proposers if req.HasField("min_proposers") else recipe.min_proposers
    if not 1 <= min_p <= n:
        raise InvalidArgument(f"min_proposers={min_p} is out of range: recipe {recipe_name!r} has {n} proposers, use 1..{n}")
    first_k = req.first_k if req.HasField("first_k") else recipe.first_k
    if first_k is not None and not min_p <= first_k <= n:
        raise InvalidArgument(f"first_k={first_k} is out of range: use min_proposers..{n} ({min_p}..{n})")
    deadline = req.layer_deadline_s if req.HasField("layer_deadline_s") else recipe.layer_deadline_s
    if deadline is not None and (not math.isfinite(deadline) or deadline <= 0):
        raise InvalidArgument(f"layer_deadline_s={deadline} must be a positive number of seconds")
    proposers = [Agent(a.model, a.system_prompt, merge_sampling(a.sampling, _own_seed(prop_over, i)))
                 for i, a in enumerate(recipe.proposers)]
    agg = recipe.aggregator
    for agent in recipe.proposers:  # a later layer's proposers read the previous layer's answers
        check_max_tokens(prop_over.get("max_tokens"), model=agent.model, field="proposer_sampling",
                         context_window=cfg.backends[agent.model].context_window, with_references=recipe.layers > 1)
    check_max_tokens(agg_over.get("max_tokens"), model=agg.model, field="aggregator_sampling",
                     context_window=cfg.backends[agg.model].context_window, with_references=True)
    aggregator = Agent(agg.model, agg.system_prompt, merge_sampling(agg.sampling, agg_over))
    return Plan(request_id=request_id, recipe_name=recipe_name, recipe=recipe, conversation=conversation,
                proposers=proposers, aggregator=aggregator, layers=recipe.layers, min_proposers=min_p,
                first_k=first_k, layer_deadline_s=deadline, metadata=dict(req.metadata))
