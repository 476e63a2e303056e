"""TLS and mutual TLS credentials from config, for servers and for clients (channels: moaa.client.endpoint)."""
from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import grpc

from moaa.errors import UserError
from moaa.services.config import TLSConfig


_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


def _read(path: str, what: str) -> bytes:
    """A PEM file of the kind `what` names (a key, or certificates), read and checked now: gRPC's C core would
    log its own errors and fail the first call as UNAVAILABLE, which a retry cannot fix."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from None
    blocks = _BLOCK.findall(data)
    if not blocks:
        raise UserError(f"{what} {path} is not PEM (no '-----BEGIN' line): give the PEM file")
    labels = {label.decode() for label, _ in blocks}
    want_key = what.endswith("key")
    if want_key and not any(label.endswith("PRIVATE KEY") for label in labels):
        raise UserError(f"{what} {path} holds {', '.join(sorted(labels))}, not a private key: give the key file "
                        "(are the certificate and the key swapped?)")
    if not want_key and "CERTIFICATE" not in labels:
        raise UserError(f"{what} {path} holds {', '.join(sorted(labels))}, not a certificate: give the certificate "
                        "file (are the certificate and the key swapped?)")
    for label, body in blocks:
        try:
            base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise UserError(f"{what} {path}: its {label.decode()} block is damaged (the base64 does not decode)") \
                from None
    return data


def server_credentials(cfg: TLSConfig) -> grpc.ServerCredentials | None:
    """None when TLS is off; with `client_ca_file`, clients must present a certificate it signed."""
    if not cfg.enabled:
        if cfg.cert_file or cfg.key_file:
            raise UserError("tls needs both cert_file and key_file")
        return None
    key = _read(cfg.key_file, "TLS key")
    cert = _read(cfg.cert_file, "TLS certificate")
    ca = _read(cfg.client_ca_file, "client CA") if cfg.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(ca_file: str | None = None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials:
    """Client credentials: a CA to trust (None = system roots) and optionally a client certificate."""
    ca = _read(ca_file, "CA certificate") if ca_file else None
    if bool(cert_file) != bool(key_file):
        raise UserError("a client certificate needs both --tls-cert and --tls-key")
    cert = _read(cert_file, "client certificate") if cert_file else None
    key = _read(key_file, "client key") if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
