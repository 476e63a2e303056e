from moaa.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Candidate(_message.Message):
    __slots__ = ("id", "text", "model")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    model: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class AnnotateRequest(_message.Message):
    __slots__ = ("request_id", "id", "prompt", "candidates", "ensemble", "judges", "mode", "reference", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    JUDGES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    id: str
    prompt: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    ensemble: str
    judges: _containers.RepeatedScalarFieldContainer[str]
    mode: str
    reference: Candidate
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., id: _Optional[str] = ..., prompt: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., ensemble: _Optional[str] = ..., judges: _Optional[_Iterable[str]] = ..., mode: _Optional[str] = ..., reference: _Optional[_Union[Candidate, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class JudgeScore(_message.Message):
    __slots__ = ("candidate_id", "score", "rationale", "abstained", "abstain_reason", "criteria", "position", "overall")
    class CriteriaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    ABSTAINED_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_REASON_FIELD_NUMBER: _ClassVar[int]
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    OVERALL_FIELD_NUMBER: _ClassVar[int]
    candidate_id: str
    score: float
    rationale: str
    abstained: bool
    abstain_reason: str
    criteria: _containers.ScalarMap[str, float]
    position: int
    overall: float
    def __init__(self, candidate_id: _Optional[str] = ..., score: _Optional[float] = ..., rationale: _Optional[str] = ..., abstained: _Optional[bool] = ..., abstain_reason: _Optional[str] = ..., criteria: _Optional[_Mapping[str, float]] = ..., position: _Optional[int] = ..., overall: _Optional[float] = ...) -> None: ...

class JudgeReport(_message.Message):
    __slots__ = ("judge", "model", "scores", "permutation_seed", "order", "position_bias", "length_correlation", "agreement", "abstentions", "template", "template_hash", "usage", "criteria", "order_flip_rate", "requests")
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PERMUTATION_SEED_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    POSITION_BIAS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    ABSTENTIONS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_HASH_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    ORDER_FLIP_RATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    judge: str
    model: str
    scores: _containers.RepeatedCompositeFieldContainer[JudgeScore]
    permutation_seed: int
    order: _containers.RepeatedScalarFieldContainer[int]
    position_bias: float
    length_correlation: float
    agreement: float
    abstentions: int
    template: str
    template_hash: str
    usage: _common_pb2.Usage
    criteria: _containers.RepeatedScalarFieldContainer[str]
    order_flip_rate: float
    requests: int
    def __init__(self, judge: _Optional[str] = ..., model: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[JudgeScore, _Mapping]]] = ..., permutation_seed: _Optional[int] = ..., order: _Optional[_Iterable[int]] = ..., position_bias: _Optional[float] = ..., length_correlation: _Optional[float] = ..., agreement: _Optional[float] = ..., abstentions: _Optional[int] = ..., template: _Optional[str] = ..., template_hash: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., criteria: _Optional[_Iterable[str]] = ..., order_flip_rate: _Optional[float] = ..., requests: _Optional[int] = ...) -> None: ...

class CriterionReport(_message.Message):
    __slots__ = ("name", "kept", "reason", "disagreement", "length_correlation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    kept: bool
    reason: str
    disagreement: float
    length_correlation: float
    def __init__(self, name: _Optional[str] = ..., kept: _Optional[bool] = ..., reason: _Optional[str] = ..., disagreement: _Optional[float] = ..., length_correlation: _Optional[float] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("candidate_id", "score", "rank")
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    candidate_id: str
    score: float
    rank: int
    def __init__(self, candidate_id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class AnnotateResponse(_message.Message):
    __slots__ = ("request_id", "id", "judges", "combined", "chosen_id", "rejected_id", "margin", "agreement", "skipped", "skip_reason", "criteria", "failures", "mode", "ensemble", "seed", "usage", "combine", "note")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    JUDGES_FIELD_NUMBER: _ClassVar[int]
    COMBINED_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_ID_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SKIP_REASON_FIELD_NUMBER: _ClassVar[int]
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    id: str
    judges: _containers.RepeatedCompositeFieldContainer[JudgeReport]
    combined: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    chosen_id: str
    rejected_id: str
    margin: float
    agreement: float
    skipped: bool
    skip_reason: str
    criteria: _containers.RepeatedCompositeFieldContainer[CriterionReport]
    failures: _containers.RepeatedCompositeFieldContainer[_common_pb2.BackendError]
    mode: str
    ensemble: str
    seed: int
    usage: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelUsage]
    combine: str
    note: str
    def __init__(self, request_id: _Optional[str] = ..., id: _Optional[str] = ..., judges: _Optional[_Iterable[_Union[JudgeReport, _Mapping]]] = ..., combined: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ..., chosen_id: _Optional[str] = ..., rejected_id: _Optional[str] = ..., margin: _Optional[float] = ..., agreement: _Optional[float] = ..., skipped: _Optional[bool] = ..., skip_reason: _Optional[str] = ..., criteria: _Optional[_Iterable[_Union[CriterionReport, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[_common_pb2.BackendError, _Mapping]]] = ..., mode: _Optional[str] = ..., ensemble: _Optional[str] = ..., seed: _Optional[int] = ..., usage: _Optional[_Iterable[_Union[_common_pb2.ModelUsage, _Mapping]]] = ..., combine: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class AnnotateResult(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: AnnotateResponse
    error: _common_pb2.ErrorDetail
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[AnnotateResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class ListEnsemblesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EnsembleInfo(_message.Message):
    __slots__ = ("name", "judges", "aggregator", "mode", "combine")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JUDGES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    name: str
    judges: _containers.RepeatedScalarFieldContainer[str]
    aggregator: str
    mode: str
    combine: str
    def __init__(self, name: _Optional[str] = ..., judges: _Optional[_Iterable[str]] = ..., aggregator: _Optional[str] = ..., mode: _Optional[str] = ..., combine: _Optional[str] = ...) -> None: ...

class ListEnsemblesResponse(_message.Message):
    __slots__ = ("ensembles", "default_ensemble")
    ENSEMBLES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    ensembles: _containers.RepeatedCompositeFieldContainer[EnsembleInfo]
    default_ensemble: str
    def __init__(self, ensembles: _Optional[_Iterable[_Union[EnsembleInfo, _Mapping]]] = ..., default_ensemble: _Optional[str] = ...) -> None: ...
