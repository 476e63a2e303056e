"""gRPC's HTTP/2 connection settings, both sides: what every moaa server sets (TransportConfig) and what the
one client channel builder (moaa/client/endpoint.py) sets, kept in one module so that the server's ping
policy always accepts our clients' keepalive pings.

- Connection age: a client keeps one HTTP/2 connection, so behind a Kubernetes ClusterIP Service it would
  stay on one pod forever and new replicas would get nothing. The server sends GOAWAY at
  max_connection_age_s (gRPC adds +-10 % jitter); the client opens a new connection for its next calls
  (the Service picks a pod again), calls in flight get max_connection_age_grace_s to finish, then the
  connection is closed (they end UNAVAILABLE "max connection age"). Batch streams end themselves
  gracefully after the same age (services/common/stream.py): their held items finish, the client resends
  the rest on a new call, so a long pipeline run is rebalanced too and loses nothing.
- write_timeout_s: a streamed result waits inside grpc's write while the client reads nothing (HTTP/2 flow
  control), and the client's transport still answers pings; the write is bounded (rpc.write_within), else
  only the connection's age + grace would end the call.
- Keepalive: our clients ping every CLIENT_KEEPALIVE_S even with no call open, and give a peer that does
  not answer CLIENT_KEEPALIVE_TIMEOUT_S: a gateway pod lost without a FIN fails the call UNAVAILABLE (and
  the window driver resends) instead of hanging until its deadline. The server accepts pings as often as
  min_client_ping_interval_s (below our clients' interval: a client pinging more often than the server
  allows is sent GOAWAY ENHANCE_YOUR_CALM "too_many_pings"), and pings its clients itself, so the streams
  of a client that vanished are cancelled.
- compression: off by default. gzip or deflate shrinks big batch results where the network is what is
  scarce (across zones or regions), for CPU on both sides; gRPC core then compresses every message whatever
  the client's grpc-accept-encoding says, so every client must decompress it (grpc-python, grpc-js, Java and
  C++ do; grpc-go only with its gzip encoding imported): one that cannot fails INTERNAL naming the algorithm.
- max_concurrent_streams: HTTP/2 streams one connection may have open; more wait in the client for a free
  one. Well above max_in_flight by default, so overload is still RESOURCE_EXHAUSTED from the in-flight
  bound, while one connection cannot open unbounded Health.Watch or request streams.
"""
from __future__ import annotations

from typing import Literal

import grpc
from pydantic import Field

from moaa.services.common.strict import Strict

# Our clients' keepalive (moaa/client/endpoint.py): the server's min_client_ping_interval_s must stay at or
# below CLIENT_KEEPALIVE_S (a test checks the defaults).
CLIENT_KEEPALIVE_S = 30.0
CLIENT_KEEPALIVE_TIMEOUT_S = 10.0


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class TransportConfig(Strict):
    """A server's HTTP/2 connection settings (`gateway.transport`, `annotator.transport`)."""

    max_connection_age_s: float | None = Field(
        300.0, gt=0, description="GOAWAY a connection after this long (+-10 % jitter) so clients reconnect and a "
        "Kubernetes Service spreads them over the replicas; batch streams end gracefully after it and clients "
        "resend the rest; null = never")
    max_connection_age_grace_s: float = Field(
        600.0, ge=0, description="calls still open on a GOAWAY'd connection get this long, then end UNAVAILABLE "
        "(clients resend unanswered batch items); above age x 1.1 + one item's time, a batch stream's own end at "
        "the age comes first and no item is cut")
    keepalive_time_s: float = Field(60.0, gt=0, description="ping a client after this long without activity")
    keepalive_timeout_s: float = Field(20.0, gt=0, description="a client that does not answer a ping within "
                                       "this is gone: its connection is closed and its calls cancelled")
    min_client_ping_interval_s: float = Field(
        10.0, gt=0, description="accept client keepalive pings this often (moaa clients ping every "
        f"{CLIENT_KEEPALIVE_S:g} s); faster pingers get GOAWAY too_many_pings")
    write_timeout_s: float | None = Field(
        120.0, gt=0, description="a streaming call's client that takes none of a message for this long: the call "
        "ends UNAVAILABLE and its in-flight slots are freed (a client that reads nothing would hold them until "
        "its deadline); null = until the connection's age + grace")
    max_concurrent_streams: int = Field(
        2048, ge=1, description="open streams (calls) per connection; more wait in the client. Keep it above "
        "max_in_flight, or overload is queued in clients instead of answered RESOURCE_EXHAUSTED")

    compression: Literal["none", "gzip", "deflate"] = Field(
        "none", description="compress every message the server sends (gRPC message compression): less network "
        "for big batch results, more CPU; every client must decompress it (grpc-go only with its gzip encoding "
        "imported), whatever it advertises; none by default")

    def server_compression(self) -> grpc.Compression:
        return {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip,
                "deflate": grpc.Compression.Deflate}[self.compression]

    def server_options(self) -> list[tuple[str, int]]:
        """grpc.aio.server options for these settings."""
        opts = [
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout_s)),
            ("grpc.http2.ping_timeout_ms", _ms(self.keepalive_timeout_s)),   # as the client's, below
            ("grpc.keepalive_permit_without_calls", 1),   # our clients ping with no call open
            ("grpc.http2.min_recv_ping_interval_without_data_ms", _ms(self.min_client_ping_interval_s)),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.min_client_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.http2.max_pings_without_data", 0),     # the server's own keepalive pings on an idle stream
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
        ]
        if self.max_connection_age_s is not None:
            opts += [("grpc.max_connection_age_ms", _ms(self.max_connection_age_s)),
                     ("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace_s))]
        return opts


def client_options(keepalive_s: float = CLIENT_KEEPALIVE_S,
                   keepalive_timeout_s: float = CLIENT_KEEPALIVE_TIMEOUT_S) -> list[tuple[str, int | str]]:
    """Channel options of the one client channel builder: keepalive pings (also with no call open, and
    without limit on an idle stream), and round_robin over the addresses a target resolves to (a
    `dns:///` name of a headless Service: one connection per pod, calls spread; one address: as before)."""
    return [
        ("grpc.keepalive_time_ms", _ms(keepalive_s)),
        ("grpc.keepalive_timeout_ms", _ms(keepalive_timeout_s)),
        # since grpc/grpc#34647 this (default 60 s) and not keepalive_timeout_ms bounds the wait for a ping's ack
        ("grpc.http2.ping_timeout_ms", _ms(keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.lb_policy_name", "round_robin"),
    ]
