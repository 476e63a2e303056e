"""One backend's settings in the moaa config file: its replicas' URLs, API key, limits, timeouts, retries,
circuit breaker and probes, and the sampling a request asks for: what the backend client is built from."""
from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from moaa.services.common.strict import EnvName, Strict



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


class TimeoutConfig(Strict):
    connect_s: float = Field(5.0, gt=0, description="TCP connect timeout")
    first_token_s: float = Field(60.0, gt=0, description="time to the first streamed chunk or the response headers")
    chunk_gap_s: float = Field(30.0, gt=0, description="longest allowed gap between two streamed chunks")
    total_s: float = Field(600.0, gt=0, description="whole request, retries excluded")


class RetryConfig(Strict):
    max_attempts: int = Field(3, ge=1, description="attempts per request, only while nothing was streamed")
    backoff_base_s: float = Field(0.2, gt=0)
    backoff_max_s: float = Field(5.0, gt=0)


class CircuitConfig(Strict):
    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open a replica's circuit")
    reset_after_s: float = Field(10.0, gt=0, description="time before a half-open trial request")


class HealthConfig(Strict):
    probe_interval_s: float = Field(15.0, gt=0, description="period of the tiny real completion used as a probe")
    probe_timeout_s: float = Field(10.0, gt=0)
    probe_max_tokens: int = Field(1, ge=1)


class BackendConfig(Strict):
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


class SamplingConfig(Strict):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


def nth_seed(seed: int, i: int) -> int:
    """The seed of the i-th of several requests made for one seeded request (n samples sent one by one, a
    recipe's proposers): seed + i, wrapped into int64 (the APIs' type). The same seed gives the same
    answers, and no two of the requests draw alike."""
    return (seed + i + 2**63) % 2**64 - 2**63
