"""What the services serve, checked before a run pays for work: the recipe (gateway) or ensemble (annotator) a
run names, or the default it relies on. A typo found only when its stage runs would strand the run folder,
whose recorded settings then refuse the fixed command."""
from __future__ import annotations

import asyncio

import grpc

from moaa.errors import UserError

from .endpoint import Endpoint
from .errors import call_error, retry_delay

CALL_TIMEOUT_S = 10.0


async def _names(ep: Endpoint, kind: str) -> tuple[list[str], str | None] | None:
    """(served names, default name: "" when there is none, None when the server does not say) of `kind`
    ("recipe" or "ensemble"); None for an annotator that predates ListEnsembles (nothing to check against)."""
    from moaa.v1 import annotator_pb2, annotator_pb2_grpc, gateway_pb2, gateway_pb2_grpc

    tries = 0
    async with ep.channel() as channel:
        while True:
            try:
                if kind == "recipe":
                    resp = await gateway_pb2_grpc.MoAGatewayStub(channel).ListModels(
                        gateway_pb2.ListModelsRequest(), metadata=ep.metadata, timeout=CALL_TIMEOUT_S)
                    # a gateway older than default_recipe does not say: the name it would pick is not checked
                    default = resp.default_recipe if resp.HasField("default_recipe") else None
                    return [r.name for r in resp.recipes], default
                resp = await annotator_pb2_grpc.AnnotatorStub(channel).ListEnsembles(
                    annotator_pb2.ListEnsemblesRequest(), metadata=ep.metadata, timeout=CALL_TIMEOUT_S)
                default = resp.default_ensemble if resp.HasField("default_ensemble") else None
                return [e.name for e in resp.ensembles], default
            except grpc.aio.AioRpcError as err:
                if kind == "ensemble" and err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return None
                delay = retry_delay(err, tries)
                if delay is None:
                    service = "gateway ListModels" if kind == "recipe" else "annotator ListEnsembles"
                    raise call_error(err, f"{service} at {ep.address}", tries=tries) from None
                tries += 1
                await asyncio.sleep(delay)


async def check_served(ep: Endpoint, kind: str, name: str) -> None:
    """UserError unless the service serves `name`, or (no name) has a default `kind`."""
    served = await _names(ep, kind)
    if served is None:
        return
    known, default = served
    service, flag = ("gateway", "--recipe") if kind == "recipe" else ("annotator", "--ensemble")
    listed = ", ".join(sorted(known)) or "none"
    if name and name not in known:
        raise UserError(f"{flag} {name!r}: the {service} at {ep.address} serves the {kind}s {listed}")
    if not name and default == "":
        raise UserError(f"the {service} at {ep.address} has no default {kind} ({kind}s: {listed}): name one "
                        f"with {flag}")
