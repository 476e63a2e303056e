"""The one moaa config file (YAML), validated into typed objects.

The same file is written by the CLI for the embedded backends and rendered by the Helm chart into a
ConfigMap. It names the backends (model name -> endpoints and limits), the MoA recipes, the judge
ensembles, and the gateway's and annotator's server settings.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moaa.errors import UserError, validation_message
from moaa.overrides import load_mapping


class ConfigError(UserError, ValueError):
    """A config file that cannot be used; the message says what to change (the CLI exits 2 with it)."""


class _Strict(BaseModel):
    # strict: a quoted number or YAML's yes/on where a number belongs is the file's mistake, not a value;
    # finite: .inf as a limit would crash the throttle at start (leave a limit out for none)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# a name something else refers to (a backend, recipe, ensemble, judge): never empty
Name = Annotated[str, Field(min_length=1)]
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(name: str) -> str:
    # never echo the value: the usual mistake is pasting the secret itself here (it would reach the logs)
    if not _ENV_NAME.fullmatch(name):
        raise ValueError("must be the name of an environment variable (letters, digits, _) that holds the secret, "
                         "not the secret itself")
    return name


# the name of an environment variable holding a secret (an API key, bearer tokens)
EnvName = Annotated[str, AfterValidator(_env_name)]
_GRPC_SCHEMES = {"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds", "google-c2p"}


def _check_url(url: str) -> str:
    """One replica's base URL, normalised (no trailing slash); ValueError says what to change."""
    parts = urlsplit(url)
    # URLs are logged (probe warnings, errors): never echo credentials or a query that may hold a key
    if "@" in parts.netloc:
        raise ValueError("a backend URL holds credentials (user:password@): they would be logged with the URL; "
                         "put the key in api_key_env or api_key_file")
    if parts.query or parts.fragment:
        raise ValueError(f"backend URL {url.split('?')[0].split('#')[0]!r} has a query or fragment, which is not "
                         "repeated here: moaa appends /chat/completions to a base URL; a key goes in api_key_env")
    if any(c.isspace() for c in url):
        raise ValueError(f"backend URL {url!r} contains a space")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"backend URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"backend URL {url!r} has no host: write e.g. http://vllm-qwen:8000/v1")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"backend URL {url!r} has an invalid port (1..65535)") from None
    url = url.rstrip("/")
    if url.endswith("/completions"):  # the endpoint, not the base: moaa would post to .../chat/completions/chat/completions
        raise ValueError(f"backend URL {url!r} is an endpoint, not a base URL: "
                         f"give the part before /chat/completions (usually ending in /v1)")
    return url


class TimeoutConfig(_Strict):
    connect_s: float = Field(5.0, gt=0, description="TCP connect timeout")
    first_token_s: float = Field(60.0, gt=0, description="time to the first streamed chunk or the response headers")
    chunk_gap_s: float = Field(30.0, gt=0, description="longest allowed gap between two streamed chunks")
    total_s: float = Field(600.0, gt=0, description="whole request, retries excluded")


class RetryConfig(_Strict):
    max_attempts: int = Field(3, ge=1, description="attempts per request, only while nothing was streamed")
    backoff_base_s: float = Field(0.2, gt=0)
    backoff_max_s: float = Field(5.0, gt=0)


class CircuitConfig(_Strict):
    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open a replica's circuit")
    reset_after_s: float = Field(10.0, gt=0, description="time before a half-open trial request")


class HealthConfig(_Strict):
    probe_interval_s: float = Field(15.0, gt=0, description="period of the tiny real completion used as a probe")
    probe_timeout_s: float = Field(10.0, gt=0)
    probe_max_tokens: int = Field(1, ge=1)


class BackendConfig(_Strict):
    """One model served by one or more OpenAI-compatible replicas."""

    urls: list[str] = Field(min_length=1, description="base URLs of the replicas, e.g. http://vllm-qwen:8000/v1")
    served_model: str | None = Field(None, min_length=1, description="model name sent in requests; default: the backend's key")
    api_key_env: EnvName | None = Field(None, description="environment variable holding the bearer token")
    api_key_file: str | None = Field(None, min_length=1, description="file holding the bearer token (a mounted Secret)")
    rate_limit_per_s: float | None = Field(None, gt=0, description="requests per second, all replicas together")
    max_concurrency: int = Field(32, ge=1, description="requests in flight per replica; halved on 429, regrown after")
    max_queued: int = Field(4096, ge=0, description="requests waiting for a slot (all replicas together) before "
                            "new ones fail at once with cause queue_full")
    context_window: int = Field(4096, ge=64, description="model context length in tokens")
    tokenizer: str | None = Field(None, min_length=1, description="tokenizer folder or hub id for counting reference tokens")
    supports_n: bool = Field(True, description="false when the server ignores n (transformers serve): moaa sends n requests")
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="the request field for the reply's length: max_completion_tokens for hosted OpenAI "
                                  "reasoning models, which refuse max_tokens (transformers serve ignores the other)")
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)
    retries: RetryConfig = Field(default_factory=RetryConfig)
    circuit: CircuitConfig = Field(default_factory=CircuitConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)

    @field_validator("urls")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        urls = [_check_url(u) for u in urls]
        dup = sorted({u for u in urls if urls.count(u) > 1})
        if dup:  # one server listed twice would get twice its max_concurrency
            raise ValueError(f"lists {', '.join(dup)} twice; each replica once")
        return urls

    @model_validator(mode="after")
    def _one_key_source(self) -> "BackendConfig":
        if self.api_key_env and self.api_key_file:
            raise ValueError("set one of api_key_env and api_key_file, not both")
        return self


class SamplingConfig(_Strict):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class AgentConfig(_Strict):
    """One model in a role: which backend, with which system prompt and sampling."""

    model: str = Field(description="backend name")
    system_prompt: str | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


class RecipeConfig(_Strict):
    """A MoA recipe: `layers` proposer layers, then one aggregator."""

    proposers: list[AgentConfig] = Field(min_length=1)
    aggregator: AgentConfig
    layers: int = Field(1, ge=1, description="proposer layers; layer i>1 sees layer i-1's answers")
    min_proposers: int = Field(1, ge=1, description="fewest proposals a layer needs; fewer -> UNAVAILABLE")
    first_k: int | None = Field(None, ge=1, description="aggregate after the first k proposals of a layer")
    layer_deadline_s: float | None = Field(None, gt=0, description="aggregate whatever arrived by this deadline")
    aggregate_instruction: str | None = Field(None, description="replaces the built-in aggregate-and-synthesize instruction")
    reference_max_tokens: int | None = Field(None, ge=1, description="cap per reference before context fitting")

    @model_validator(mode="after")
    def _consistent(self) -> "RecipeConfig":
        n = len(self.proposers)
        if self.min_proposers > n:
            raise ValueError(f"min_proposers={self.min_proposers} exceeds the {n} proposers")
        if self.first_k is not None and self.first_k > n:
            raise ValueError(f"first_k={self.first_k} exceeds the {n} proposers")
        if self.first_k is not None and self.first_k < self.min_proposers:
            raise ValueError(f"first_k={self.first_k} is below min_proposers={self.min_proposers}")
        return self


class JudgeConfig(_Strict):
    name: Name
    model: str = Field(description="backend name")
    template: str = Field("pointwise_v1", description="judging prompt template name (file in the annotator's templates)")
    weight: float = Field(1.0, gt=0)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0, max_tokens=512))


class EnsembleConfig(_Strict):
    """The judge ensemble of MoA-as-reward-model."""

    judges: list[JudgeConfig] = Field(min_length=1)
    aggregator: JudgeConfig | None = Field(None, description="aggregator judge for mode 'moa'")
    mode: Literal["pointwise", "pairwise", "moa"] = "moa"
    combine: Literal["mean", "weighted", "aggregator"] = "aggregator"
    scale_min: float = 1.0
    scale_max: float = 10.0
    min_margin: float = Field(0.5, ge=0, description="skip the pair when chosen - rejected is below this")
    min_agreement: float = Field(-1.0, ge=-1, le=1, description="skip when mean Kendall tau is below this")
    max_abstain_fraction: float = Field(0.5, ge=0, le=1, description="skip when more judges than this abstained")
    min_judges: int | None = Field(None, ge=1, description=(
        "judges whose backends must answer for a prompt to be decided; fewer -> the item fails UNAVAILABLE "
        "(retried), never a skip. Default: all judges asked. In mode 'moa' the aggregator judge must answer too"))
    criteria_filter: bool = Field(True, description="dynamic criteria filtering")
    max_criterion_disagreement: float = Field(3.0, ge=0, description="drop a criterion whose judges' ratings spread more than this")
    max_criterion_length_corr: float = Field(0.9, ge=0, le=1, description="drop a criterion that merely tracks length")
    seed: int = 0
    criteria_length_min_candidates: int = Field(
        5, ge=3, description="measure a criterion's length correlation only with at least this many answers")
    pointwise_template: str = Field("pointwise_v1", description="template for judges whose own is not pointwise, in mode 'pointwise'")
    pairwise_template: str = Field("pairwise_v1", description="template for judges whose own is not pairwise, in mode 'pairwise'")
    aggregator_template: str = Field("aggregator_v1", description="template of the aggregator judge when its own is not an aggregator template")
    templates_dir: str | None = Field(None, description="extra folder of judging templates (<name>.txt); overrides built-ins of the same name")

    @model_validator(mode="after")
    def _unique_names(self) -> "EnsembleConfig":
        names = [j.name for j in self.judges]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"judge names must be unique; repeated: {', '.join(dup)}")
        if self.aggregator is not None and self.aggregator.name in names:  # records are kept per judge name
            raise ValueError(f"the aggregator judge's name {self.aggregator.name!r} is also a judge's; give it its own")
        if self.scale_max <= self.scale_min:
            raise ValueError("scale_max must be larger than scale_min")
        if self.min_judges is not None and self.min_judges > len(self.judges):
            raise ValueError(f"min_judges={self.min_judges} exceeds the {len(self.judges)} judges")
        return self


class TLSConfig(_Strict):
    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = Field(None, description="set to require client certificates (mutual TLS)")

    @model_validator(mode="after")
    def _complete(self) -> "TLSConfig":
        # half a setting must not quietly serve plaintext
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a server certificate needs both cert_file and key_file")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("client_ca_file (mutual TLS) needs the server's cert_file and key_file too")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file and self.key_file)


class ClientTLSConfig(_Strict):
    """How the gateway reaches the annotator over TLS (the annotator's own `tls` is the server side)."""

    enabled: bool = Field(False, description="TLS with the system's root CAs unless ca_file is set")
    ca_file: str | None = Field(None, description="CA that signed the annotator's certificate (implies enabled)")
    cert_file: str | None = Field(None, description="client certificate, for an annotator that requires mutual TLS")
    key_file: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> "ClientTLSConfig":
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")
        return self

    @property
    def on(self) -> bool:
        return self.enabled or bool(self.ca_file or self.cert_file)


class AuthConfig(_Strict):
    # an empty setting is an error, not auth off (e.g. a template that rendered an empty value)
    tokens_file: str | None = Field(None, min_length=1, description="file with one bearer token per line (a mounted Secret)")
    tokens_env: EnvName | None = Field(None, description="environment variable with comma-separated tokens")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file or self.tokens_env)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; None = off")
    max_in_flight: int = Field(1024, ge=1, description="work in flight: unary calls plus items of batch streams; "
                               "unary calls beyond it get RESOURCE_EXHAUSTED, stream items wait")
    max_prompt_chars: int = Field(200_000, ge=1)
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=2**31 - 1, description="largest request; gRPC's own "
                                   "limit is 2 GiB - 1")
    batch_window: int = Field(256, ge=1, description="upper bound on the items of one batch stream held at once "
                              "(running or waiting to be written); within it, items start as the backends have room")
    shutdown_grace_s: float = Field(30.0, ge=0)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)


class AnnotatorConfig(ServerConfig):
    """The annotator's server settings: the common ones plus its limits on candidates (an error under `gateway:`)."""

    port: int = Field(50052, ge=0, le=65535)
    max_candidates: int = Field(16, ge=2, description="most candidates per request")
    max_candidate_bytes: int = Field(256 * 1024, ge=1, description="most UTF-8 bytes per candidate text")


class GatewayConfig(ServerConfig):
    """The gateway's server settings: gRPC plus the OpenAI-compatible HTTP door on `http_port`."""

    http_port: int | None = Field(8080, ge=0, le=65535,
                                  description="OpenAI-compatible HTTP (/v1/chat/completions) port; null = off, 0 = any free port")
    http_client_timeout_s: float = Field(75.0, gt=0, description="HTTP door: a connection that sends no whole request "
                                         "(headers) for this long is closed, a request body slower than this gets 408, a "
                                         "streamed answer's client that takes nothing of it for this long is disconnected; "
                                         "above a reverse proxy's idle keep-alive (nginx: 60 s)")


class MoaaConfig(_Strict):
    backends: dict[Name, BackendConfig] = Field(min_length=1)
    recipes: dict[Name, RecipeConfig] = Field(default_factory=dict)
    default_recipe: str | None = None
    ensembles: dict[Name, EnsembleConfig] = Field(default_factory=dict)
    default_ensemble: str | None = None
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    annotator: AnnotatorConfig = Field(default_factory=AnnotatorConfig)
    annotator_address: str | None = Field(None, description="host:port of the annotator, for annotate=true calls")
    annotator_tls: ClientTLSConfig = Field(default_factory=ClientTLSConfig,
                                           description="TLS / mutual TLS from the gateway to the annotator")

    @field_validator("annotator_address")
    @classmethod
    def _host_port(cls, address: str | None) -> str | None:
        """host:port, or a gRPC target with a scheme (dns:///..., unix:...): checked now, not at the first
        annotate=true call (gRPC would quietly take a missing port as 443)."""
        if address is None or address.split(":", 1)[0] in _GRPC_SCHEMES:
            return address
        if any(c.isspace() for c in address):
            raise ValueError(f"{address!r} contains a space: write host:port, e.g. moaa-annotator:50052")
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{address!r} needs a port (1..65535): write host:port, e.g. moaa-annotator:50052")
        if not host.strip("[]"):
            raise ValueError(f"{address!r} has no host: write host:port, e.g. moaa-annotator:50052")
        return address

    @model_validator(mode="after")
    def _references_exist(self) -> "MoaaConfig":
        known = set(self.backends)
        missing: list[str] = []
        for rname, recipe in self.recipes.items():
            for agent in [*recipe.proposers, recipe.aggregator]:
                if agent.model not in known:
                    missing.append(f"recipes.{rname} uses model {agent.model!r}")
        for ename, ens in self.ensembles.items():
            for judge in [*ens.judges, *([ens.aggregator] if ens.aggregator else [])]:
                if judge.model not in known:
                    missing.append(f"ensembles.{ename} judge {judge.name!r} uses model {judge.model!r}")
        if missing:
            raise ValueError("unknown backend: " + "; ".join(missing) + f" (backends: {', '.join(sorted(known))})")
        if self.default_recipe is not None and self.default_recipe not in self.recipes:
            raise ValueError(f"default_recipe {self.default_recipe!r} is not a recipe")
        if self.default_ensemble is not None and self.default_ensemble not in self.ensembles:
            raise ValueError(f"default_ensemble {self.default_ensemble!r} is not an ensemble")
        return self

    def judge_backends(self) -> dict[str, BackendConfig]:
        """The backends some ensemble's judges use: all the annotator opens (and needs API keys for)."""
        used = {j.model for e in self.ensembles.values() for j in [*e.judges, *([e.aggregator] if e.aggregator else [])]}
        return {name: b for name, b in self.backends.items() if name in used}

    def recipe(self, name: str | None) -> tuple[str, RecipeConfig]:
        return _pick("recipe", self.recipes, self.default_recipe, name)

    def ensemble(self, name: str | None) -> tuple[str, EnsembleConfig]:
        return _pick("ensemble", self.ensembles, self.default_ensemble, name)


def _pick(kind: str, table: dict, default: str | None, name: str | None) -> tuple:
    """The named entry, or the default one (the only one, or `default_<kind>`)."""
    if name:
        if name not in table:
            raise KeyError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table)) or 'none'}")
        return name, table[name]
    if default:
        return default, table[default]
    if len(table) == 1:
        return next(iter(table.items()))
    raise KeyError(f"no {kind} named and no default_{kind} set")


def parse_config(data: dict, source: str = "config") -> MoaaConfig:
    return _validate(MoaaConfig, data, source)


def parse_backend(fields: dict, source: str) -> BackendConfig:
    """One backend built from command-line flags (moaa eval's judge and contestant), with the config's
    one-line errors: pydantic's own text spans lines and repeats the input, a pasted API key included."""
    return _validate(BackendConfig, fields, source)


def _validate(model: type[BaseModel], data: dict, source: str):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {validation_message(err)}") from None


def load_config(path: str | Path) -> MoaaConfig:
    """Read and validate a config file; raises ConfigError with a one-line, readable message. Read by
    the one reader of moaa's files (YAML 1.2 numbers and booleans, a repeated key is an error)."""
    try:
        data = load_mapping(path, "config")
    except UserError as err:
        raise ConfigError(str(err)) from None
    return parse_config(data, str(path))


def load_server_config(path: str | Path, section: Literal["gateway", "annotator"],
                       host: str | None = None, port: int | None = None) -> MoaaConfig:
    """Load the config for one server, with the command line's host and port taking precedence."""
    config = load_config(path)
    server = getattr(config, section)
    if port is not None:
        server.port = port
    if host:
        server.host = host
    return config


def dump_config(config: MoaaConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
