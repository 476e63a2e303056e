from moaa.v1 import common_pb2 as _common_pb2
from moaa.v1 import annotator_pb2 as _annotator_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "recipe", "messages", "aggregator_sampling", "proposer_sampling", "min_proposers", "first_k", "layer_deadline_s", "metadata", "annotate", "ensemble")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MIN_PROPOSERS_FIELD_NUMBER: _ClassVar[int]
    FIRST_K_FIELD_NUMBER: _ClassVar[int]
    LAYER_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ANNOTATE_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    recipe: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    aggregator_sampling: _common_pb2.SamplingParams
    proposer_sampling: _common_pb2.SamplingParams
    min_proposers: int
    first_k: int
    layer_deadline_s: float
    metadata: _containers.ScalarMap[str, str]
    annotate: bool
    ensemble: str
    def __init__(self, request_id: _Optional[str] = ..., recipe: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., aggregator_sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., proposer_sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., min_proposers: _Optional[int] = ..., first_k: _Optional[int] = ..., layer_deadline_s: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., annotate: _Optional[bool] = ..., ensemble: _Optional[str] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("layer", "index", "model", "text", "usage", "latency_s", "finish_reason", "used", "trimmed", "trimmed_tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    TRIMMED_FIELD_NUMBER: _ClassVar[int]
    TRIMMED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    index: int
    model: str
    text: str
    usage: _common_pb2.Usage
    latency_s: float
    finish_reason: str
    used: bool
    trimmed: bool
    trimmed_tokens: int
    def __init__(self, layer: _Optional[int] = ..., index: _Optional[int] = ..., model: _Optional[str] = ..., text: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., latency_s: _Optional[float] = ..., finish_reason: _Optional[str] = ..., used: _Optional[bool] = ..., trimmed: _Optional[bool] = ..., trimmed_tokens: _Optional[int] = ...) -> None: ...

class LayerReport(_message.Message):
    __slots__ = ("layer", "proposals", "failures", "cancelled", "stop_reason", "latency_s", "reference_tokens", "references_trimmed")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_TRIMMED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    proposals: _containers.RepeatedCompositeFieldContainer[Proposal]
    failures: _containers.RepeatedCompositeFieldContainer[_common_pb2.BackendError]
    cancelled: int
    stop_reason: str
    latency_s: float
    reference_tokens: int
    references_trimmed: bool
    def __init__(self, layer: _Optional[int] = ..., proposals: _Optional[_Iterable[_Union[Proposal, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[_common_pb2.BackendError, _Mapping]]] = ..., cancelled: _Optional[int] = ..., stop_reason: _Optional[str] = ..., latency_s: _Optional[float] = ..., reference_tokens: _Optional[int] = ..., references_trimmed: _Optional[bool] = ...) -> None: ...

class LatencyBreakdown(_message.Message):
    __slots__ = ("total_s", "layer_s", "aggregator_ttft_s", "aggregator_s", "queue_s")
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    LAYER_S_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_TTFT_S_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    total_s: float
    layer_s: _containers.RepeatedScalarFieldContainer[float]
    aggregator_ttft_s: float
    aggregator_s: float
    queue_s: float
    def __init__(self, total_s: _Optional[float] = ..., layer_s: _Optional[_Iterable[float]] = ..., aggregator_ttft_s: _Optional[float] = ..., aggregator_s: _Optional[float] = ..., queue_s: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "aggregator_model", "layers", "usage", "latency", "failures", "finish_reason", "recipe", "metadata", "annotation")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    aggregator_model: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerReport]
    usage: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelUsage]
    latency: LatencyBreakdown
    failures: _containers.RepeatedCompositeFieldContainer[_common_pb2.BackendError]
    finish_reason: str
    recipe: str
    metadata: _containers.ScalarMap[str, str]
    annotation: _annotator_pb2.AnnotateResponse
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., aggregator_model: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerReport, _Mapping]]] = ..., usage: _Optional[_Iterable[_Union[_common_pb2.ModelUsage, _Mapping]]] = ..., latency: _Optional[_Union[LatencyBreakdown, _Mapping]] = ..., failures: _Optional[_Iterable[_Union[_common_pb2.BackendError, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., recipe: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., annotation: _Optional[_Union[_annotator_pb2.AnnotateResponse, _Mapping]] = ...) -> None: ...

class AggregatorDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("request_id", "proposal", "failure", "delta", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    proposal: Proposal
    failure: _common_pb2.BackendError
    delta: AggregatorDelta
    final: GenerateResponse
    def __init__(self, request_id: _Optional[str] = ..., proposal: _Optional[_Union[Proposal, _Mapping]] = ..., failure: _Optional[_Union[_common_pb2.BackendError, _Mapping]] = ..., delta: _Optional[_Union[AggregatorDelta, _Mapping]] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: GenerateRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[GenerateRequest, _Mapping]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: GenerateResponse
    error: _common_pb2.ErrorDetail
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[GenerateResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("request_id", "model", "messages", "n", "sampling", "annotate", "ensemble", "id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ANNOTATE_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    n: int
    sampling: _common_pb2.SamplingParams
    annotate: bool
    ensemble: str
    id: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., n: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., annotate: _Optional[bool] = ..., ensemble: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("index", "text", "finish_reason", "usage")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    finish_reason: str
    usage: _common_pb2.Usage
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("request_id", "id", "model", "samples", "usage", "note", "annotation", "failures")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    id: str
    model: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    usage: _common_pb2.Usage
    note: str
    annotation: _annotator_pb2.AnnotateResponse
    failures: _containers.RepeatedCompositeFieldContainer[_common_pb2.BackendError]
    def __init__(self, request_id: _Optional[str] = ..., id: _Optional[str] = ..., model: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., note: _Optional[str] = ..., annotation: _Optional[_Union[_annotator_pb2.AnnotateResponse, _Mapping]] = ..., failures: _Optional[_Iterable[_Union[_common_pb2.BackendError, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Replica(_message.Message):
    __slots__ = ("url", "healthy", "circuit", "in_flight", "last_error", "last_probe_latency_s")
    URL_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_PROBE_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    url: str
    healthy: bool
    circuit: str
    in_flight: int
    last_error: str
    last_probe_latency_s: float
    def __init__(self, url: _Optional[str] = ..., healthy: _Optional[bool] = ..., circuit: _Optional[str] = ..., in_flight: _Optional[int] = ..., last_error: _Optional[str] = ..., last_probe_latency_s: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "served_model", "replicas", "context_window", "max_concurrency")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    name: str
    served_model: str
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    context_window: int
    max_concurrency: int
    def __init__(self, name: _Optional[str] = ..., served_model: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., context_window: _Optional[int] = ..., max_concurrency: _Optional[int] = ...) -> None: ...

class RecipeInfo(_message.Message):
    __slots__ = ("name", "proposers", "aggregator", "layers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROPOSERS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    proposers: _containers.RepeatedScalarFieldContainer[str]
    aggregator: str
    layers: int
    def __init__(self, name: _Optional[str] = ..., proposers: _Optional[_Iterable[str]] = ..., aggregator: _Optional[str] = ..., layers: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "recipes", "default_recipe")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RECIPES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RECIPE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    recipes: _containers.RepeatedCompositeFieldContainer[RecipeInfo]
    default_recipe: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., recipes: _Optional[_Iterable[_Union[RecipeInfo, _Mapping]]] = ..., default_recipe: _Optional[str] = ...) -> None: ...
