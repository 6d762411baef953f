"""Per-launch shared secrets and the mutual HMAC-SHA256 challenge-response run on every new connection.

Handshake (each message a fixed size, read with a timeout; nothing is sent before it succeeds)::

    listener -> connector   MAGIC(4) + kind(8, padded) + nonce_l(32)
    connector -> listener   HMAC(secret, b"C" + kind + nonce_l)(32) + nonce_c(32)
    listener -> connector   HMAC(secret, b"L" + kind + nonce_c)(32)

Both sides prove they hold the secret, and a reply cannot be replayed (fresh nonces). A mismatch closes the connection;
the connector then raises `AuthError`. The secret never crosses the wire. Launchers hand it to child processes in the
``DISAGG_SECRET`` environment variable (hex), never on the command line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket

MAGIC = b"DSG1"
SECRET_ENV = "DISAGG_SECRET"
NONCE_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0


class TransportError(ConnectionError):
    """A link failed: peer gone, timed out, protocol violation, or a resource (shared memory) ran out."""


class AuthError(TransportError):
    """The peer did not prove it holds the shared secret (or we could not prove it to the peer)."""


def new_secret() -> bytes:
    """32 random bytes for one launch."""
    return secrets.token_bytes(32)


def secret_from_env() -> bytes:
    """The launch secret from ``DISAGG_SECRET`` (hex). Raises `AuthError` when it is missing or malformed."""
    raw = os.environ.get(SECRET_ENV, "")
    try:
        secret = bytes.fromhex(raw)
    except ValueError:
        raise AuthError(f"{SECRET_ENV} is not hex") from None
    if len(secret) < 16:
        raise AuthError(f"{SECRET_ENV} is missing or shorter than 16 bytes")
    return secret


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; raises `TransportError` on EOF."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise TransportError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _kind_tag(kind: str) -> bytes:
    tag = kind.encode()[:8]
    return tag + b"\0" * (8 - len(tag))


def _mac(secret: bytes, role: bytes, kind: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + kind + nonce, hashlib.sha256).digest()


def handshake_listener(sock: socket.socket, secret: bytes, kind: str, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Authenticate the peer that connected to us. Raises `AuthError` / `TransportError`; the caller closes ``sock``."""
    tag, nonce = _kind_tag(kind), os.urandom(NONCE_BYTES)
    old = sock.gettimeout()
    sock.settimeout(timeout_s)
    try:
        sock.sendall(MAGIC + tag + nonce)
        reply = recv_exact(sock, 2 * NONCE_BYTES)
        if not hmac.compare_digest(reply[:NONCE_BYTES], _mac(secret, b"C", tag, nonce)):
            raise AuthError("peer failed the HMAC challenge (wrong secret or wrong transport kind)")
        sock.sendall(_mac(secret, b"L", tag, reply[NONCE_BYTES:]))
    except TimeoutError:
        raise TransportError(f"handshake timed out after {timeout_s} s") from None
    finally:
        sock.settimeout(old)


def handshake_connector(sock: socket.socket, secret: bytes, kind: str, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Authenticate to the listener and check that it holds the secret too. Raises `AuthError` / `TransportError`."""
    tag = _kind_tag(kind)
    old = sock.gettimeout()
    sock.settimeout(timeout_s)
    try:
        hello = recv_exact(sock, 4 + 8 + NONCE_BYTES)
        if hello[:4] != MAGIC:
            raise TransportError("peer is not a disagg endpoint (bad magic)")
        if hello[4:12] != tag:
            raise TransportError(f"peer speaks transport {hello[4:12].rstrip(bytes(1)).decode(errors='replace')!r}, "
                                 f"not {kind!r}")
        nonce = os.urandom(NONCE_BYTES)
        sock.sendall(_mac(secret, b"C", tag, hello[12:]) + nonce)
        try:
            proof = recv_exact(sock, NONCE_BYTES)
        except TransportError:
            raise AuthError("peer closed the connection during the handshake (wrong secret?)") from None
        if not hmac.compare_digest(proof, _mac(secret, b"L", tag, nonce)):
            raise AuthError("peer failed to prove it holds the secret")
    except TimeoutError:
        raise TransportError(f"handshake timed out after {timeout_s} s") from None
    finally:
        sock.settimeout(old)
