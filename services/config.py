"""The one moaa config file (YAML), validated into typed objects.

The same file is written by the CLI for the embedded backends and rendered by the Helm chart into a
ConfigMap. It names the backends (model name -> endpoints and limits; their settings are
services/backend/config.py), the MoA recipes, the judge ensembles, and the gateway's and annotator's server
settings.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from moaa.errors import UserError, validation_message
from moaa.overrides import load_mapping
from moaa.services.backend.config import BackendConfig, SamplingConfig
from moaa.services.common.strict import EnvName, Name, Strict
from moaa.services.common.transport import TransportConfig


class ConfigError(UserError, ValueError):
    """A config file that cannot be used; the message says what to change (the CLI exits 2 with it)."""


_ORIGIN = re.compile(r"\*|null|[a-z][a-z0-9+.-]*://[^/?#\s]+")  # 'null': pages from file:// (Electron)
_GRPC_SCHEMES = {"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds", "google-c2p"}


def grpc_address_problem(address: str) -> str | None:
    """What is wrong with a service address, or None: host:port, or a gRPC target with a scheme (dns:///...,
    unix:...). gRPC would quietly take a missing port as 443, wrap a port past 65535 into another one, and
    retry a URL as a host that does not resolve: the config's annotator_address and every client flag say so."""
    if address.split(":", 1)[0] in _GRPC_SCHEMES:
        return None
    example = "e.g. moaa-annotator:50052"
    if "://" in address:
        return f"{address!r} is a URL: write host:port without a scheme, {example}"
    if any(c.isspace() for c in address) and address.strip():
        return f"{address!r} contains a space: write host:port, {example}"
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{address!r} needs a port (1..65535): write host:port, {example}"
    if not host.strip("[]"):
        return f"{address!r} has no host: write host:port, {example}"
    return None


class AgentConfig(Strict):
    """One model in a role: which backend, with which system prompt and sampling."""

    model: str = Field(description="backend name")
    system_prompt: str | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


class RecipeConfig(Strict):
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


JUDGE_SAMPLING = {"temperature": 0.0, "max_tokens": 512}


class JudgeConfig(Strict):
    name: Name
    model: str = Field(description="backend name")
    template: str = Field("pointwise_v1", description="judging prompt template name (file in the annotator's templates)")
    weight: float = Field(1.0, gt=0)
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(**JUDGE_SAMPLING), description=(
        "judge sampling; a key left out keeps its judge default (temperature 0, max_tokens 512); null = the server's"))

    @field_validator("sampling", mode="before")
    @classmethod
    def _judge_defaults(cls, value):
        # raising max_tokens for a reasoning judge must not also make it sample at the server's temperature
        return {**JUDGE_SAMPLING, **value} if isinstance(value, dict) else value


class EnsembleConfig(Strict):
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


class TLSConfig(Strict):
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


class ClientTLSConfig(Strict):
    """How the gateway reaches the annotator over TLS (the annotator's own `tls` is the server side)."""

    enabled: bool = Field(False, description="TLS with the system's root CAs unless ca_file is set")
    ca_file: str | None = Field(None, description="CA that signed the annotator's certificate (implies enabled)")
    cert_file: str | None = Field(None, description="client certificate, for an annotator that requires mutual TLS")
    key_file: str | None = None
    server_name: str | None = Field(None, description="the name the annotator's certificate is checked against, "
                                    "when annotator_address is another name (the chart's headless Service target)")

    @model_validator(mode="after")
    def _pair(self) -> "ClientTLSConfig":
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")
        return self

    @property
    def on(self) -> bool:
        return self.enabled or bool(self.ca_file or self.cert_file)


class AuthConfig(Strict):
    # an empty setting is an error, not auth off (e.g. a template that rendered an empty value)
    tokens_file: str | None = Field(None, min_length=1, description="file with one bearer token per line (a mounted Secret)")
    tokens_env: EnvName | None = Field(None, description="environment variable with comma-separated tokens")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file or self.tokens_env)


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; None = off")
    max_in_flight: int = Field(1024, ge=1, description="work in flight: unary calls plus items of batch streams; "
                               "unary calls beyond it get RESOURCE_EXHAUSTED, stream items wait")
    max_prompt_chars: int = Field(200_000, ge=1)
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=2**31 - 1, description="largest request: a unary call "
                                   "over it gets RESOURCE_EXHAUSTED, a batch stream item over it its own "
                                   "INVALID_ARGUMENT (the stream goes on); gRPC's own limit is 2 GiB - 1")
    batch_window: int = Field(256, ge=1, description="upper bound on the items of one batch stream held at once "
                              "(running or waiting to be written); within it, items start as the backends have room")
    shutdown_grace_s: float = Field(30.0, ge=0)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig, description="HTTP/2 connection settings: "
                                       "connection age (rebalancing), keepalive, streams per connection")


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
    http_stream_keepalive_s: float | None = Field(
        15.0, gt=0, description="HTTP door: a streamed answer with nothing to send for this long (its proposers still "
        "writing) gets its headers and an SSE comment line, and another each time as long again, so proxies (nginx, "
        "load balancers: 60 s idle) and clients (Node's fetch: 300 s without headers) keep waiting; an error after "
        "the headers is an event in the stream, before them its own status. null = headers with the first token")
    http_cors_origins: list[str] = Field(
        default_factory=list, description="HTTP door: origins (scheme://host[:port]) of web pages that may call it "
        "from a browser (CORS), e.g. http://localhost:3000, or '*' for any page; [] = none. Clients outside a "
        "browser (SDKs, curl, servers) need no entry")

    @field_validator("http_cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:  # a browser's Origin header is matched exactly: a path or a slash never matches
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin: write scheme://host[:port] with nothing after it "
                                 "(e.g. http://localhost:3000, no slash at the end), or '*' for any")
        return origins


class MoaaConfig(Strict):
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
        problem = None if address is None else grpc_address_problem(address)
        if problem:
            raise ValueError(problem)
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

    def default_name(self, kind: str) -> str:
        """The recipe (kind "recipe") or ensemble a request naming none gets, "" when it is refused."""
        try:
            return self.recipe(None)[0] if kind == "recipe" else self.ensemble(None)[0]
        except KeyError:
            return ""


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
