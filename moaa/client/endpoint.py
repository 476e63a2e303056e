"""Where a service is and how to reach it: address, TLS (CA, client certificate) and bearer token."""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from moaa.errors import UserError
from moaa.services.common.tls import channel_credentials
from moaa.services.common.transport import CLIENT_KEEPALIVE_S, CLIENT_KEEPALIVE_TIMEOUT_S, client_options
from moaa.services.config import grpc_address_problem

# Dataset rows (many proposals, long answers) can exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying a bearer token (None without one)."""
    return (("authorization", f"Bearer {token}"),) if token else None


def forwarded_auth(metadata) -> tuple[tuple[str, str], ...] | None:
    """The caller's own authorization header, for a service that calls another on the caller's behalf."""
    fwd = tuple((k, v) for k, v in (metadata or ()) if k == "authorization")
    return fwd or None


def _header_safe(text: str) -> bool:
    return text.isascii() and all(" " <= c <= "~" for c in text)


@dataclass
class Endpoint:
    address: str
    token: str | None = field(default=None, repr=False)  # a secret: never in a printed or logged endpoint
    tls_ca: str | None = None
    tls: bool = False                  # TLS with the system's trusted CAs
    cert_file: str | None = None       # client certificate, for servers that require mutual TLS
    key_file: str | None = None
    server_name: str | None = None     # the name the server's certificate is checked against, if not the address's
    keepalive_s: float = CLIENT_KEEPALIVE_S   # ping the server this often; a server must allow it (transport.py)
    keepalive_timeout_s: float = CLIENT_KEEPALIVE_TIMEOUT_S  # no answer within it: the peer is gone, UNAVAILABLE
    _creds: grpc.ChannelCredentials | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        problem = grpc_address_problem(self.address)
        if problem:   # a typo would be a retried outage (exit 75), or for a port past 65535 a call to another port
            raise UserError(f"address {problem}")
        if self.token is not None and not _header_safe(self.token):
            raise UserError("the token has characters a gRPC header cannot carry (non-ASCII, a line break or a "
                            "control character): give the token itself, as the server's tokens file holds it")
        # read certificates now: a bad path fails when the endpoint is made, not at the first call
        if self.tls or self.tls_ca or self.cert_file:
            self._creds = channel_credentials(self.tls_ca, self.cert_file, self.key_file)

    @classmethod
    def reached_as(cls, address: str, flags) -> "Endpoint":
        """`address`, reached as `flags` say: anything with token, tls_ca, tls, tls_cert and tls_key (the
        client commands' parsed flags, moaa.cli.add_connection_args; the pipeline's options)."""
        return cls(address, token=flags.token, tls_ca=flags.tls_ca, tls=flags.tls, cert_file=flags.tls_cert,
                   key_file=flags.tls_key, server_name=flags.tls_server_name)

    @property
    def metadata(self):
        return bearer(self.token)

    def channel(self) -> grpc.aio.Channel:
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                *client_options(self.keepalive_s, self.keepalive_timeout_s)]
        if self._creds is not None:
            if self.server_name:   # also the :authority the server sees
                opts.append(("grpc.ssl_target_name_override", self.server_name))
            return grpc.aio.secure_channel(self.address, self._creds, options=opts)
        return grpc.aio.insecure_channel(self.address, options=opts)
