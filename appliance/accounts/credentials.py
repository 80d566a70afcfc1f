"""Per-key upstream credentials (BYOK): a key's own API key for a backend, sealed at rest.

A key may carry, per backend name, the secret its requests present to that backend instead of the
backend's configured ``api_key``. The database holds each secret only sealed: XSalsa20-Poly1305 with a
random nonce (libsodium's secretbox, through PyNaCl), base64; the 32-byte key is ``data_dir/upstream-keys.key``
(mode 0600, hex), made on first use, so the database or a backup of it alone reveals no secret. Secrets are
opened when a worker builds a key's Principal (once per ``auth.cache_ttl_s``, with the key's other fields),
never per request, and are never returned, logged or put in a repr. PyNaCl is imported when a vault is first
used: a start without upstream keys does not pay for it. (PyNaCl, not ``cryptography``'s Fernet: the same
authenticated encryption for this use, and 1 MB in the one-file binary where ``cryptography`` takes 5.)
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import stat
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from appliance.common.errors import GatewayError

log = logging.getLogger("appliance.accounts.credentials")

KEY_FILE = "upstream-keys.key"
KEY_BYTES = 32  # libsodium's secretbox key
MAX_SECRET = 4096
# What an HTTP header value may hold without quoting: visible ASCII, no space, CR or LF.
SECRET_PATTERN = r"^[\x21-\x7e]+$"


class VaultError(Exception):
    """The key file exists but holds no usable key."""


class Vault:
    """Seals and opens secrets with the data dir's key, read (or made) once per process."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / KEY_FILE
        self._box: Any = None  # nacl.secret.SecretBox, once read
        self._reported: set[tuple[str, str]] = set()

    def seal(self, secret: str) -> str:
        """The token to store for ``secret``; makes the key file when there is none yet."""
        return base64.urlsafe_b64encode(self._key(create=True).encrypt(secret.encode())).decode("ascii")

    def open(self, token: str) -> str | None:
        """The secret sealed in ``token``; None when it cannot be opened (no key file, another key, a changed
        token). Absence is not remembered: a key file another process makes later is read then."""
        try:
            box = self._key(create=False)
        except VaultError as exc:
            log.error("%s", exc)
            return None
        if box is None:
            return None
        from nacl.exceptions import CryptoError

        try:
            return box.decrypt(base64.urlsafe_b64decode(token.encode("ascii"))).decode()
        except (CryptoError, ValueError):  # ValueError: not base64, not UTF-8, shorter than a nonce
            return None

    def open_all(self, key_id: str, sealed: Mapping[str, str]) -> dict[str, str | None]:
        """A key's credentials by backend; None for those that cannot be opened (logged once per process)."""
        opened = {backend: self.open(token) for backend, token in sealed.items()}
        for backend, secret in opened.items():
            if secret is None and (key_id, backend) not in self._reported:
                self._reported.add((key_id, backend))
                log.error("key %s: its own key for backend %r cannot be decrypted with %s (missing or replaced?); "
                          "its requests to that backend fail until an admin sets it again", key_id, backend,
                          self.path)
        return opened

    def _key(self, *, create: bool) -> Any:
        if self._box is None:
            from nacl.secret import SecretBox

            raw = read_or_create(self.path) if create else _read(self.path)
            if raw is None:
                return None
            try:
                self._box = SecretBox(bytes.fromhex(raw.strip().decode("ascii")))
            except ValueError:  # not hex, or not 32 bytes (nacl's own ValueError)
                raise VaultError(f"{self.path} holds no usable key; restore it from a backup") from None
        return self._box


def _read(path: Path) -> bytes | None:
    try:
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("%s is readable by other users (mode %o); it should be 0600", path,
                            stat.S_IMODE(mode))
            return file.read()
    except FileNotFoundError:
        return None


def read_or_create(path: Path) -> bytes:
    """The key in ``path``, made now if there is none: whole or not at all, whoever races to make it.

    The key is written to a private temporary file (O_CREAT|O_EXCL, mode 0600) and linked into place;
    link(2) fails when the name exists, so of two processes racing the first one's key wins, and no
    reader ever sees a half-written file.
    """
    existing = _read(path)
    if existing is not None:
        return existing
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, secrets.token_hex(KEY_BYTES).encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: its key is the key
    finally:
        tmp.unlink()
    made = _read(path)
    if made is None:
        raise VaultError(f"{path} vanished as it was made")
    return made


def sealed_changes(asked: Mapping[str, str | None], vault: Vault, known: Collection[str],
                   held: Collection[str] = ()) -> dict[str, str | None]:
    """The changes a create or update asks for, checked and sealed: backend -> token, or None to remove.

    A secret may be set only for a backend the appliance knows; one the key already holds may be removed
    even after its backend left the config.
    """
    out: dict[str, str | None] = {}
    for backend, secret in asked.items():
        if backend not in known and not (secret is None and backend in held):
            names = ", ".join(sorted(known)) or "none"
            raise GatewayError("invalid_value", f"upstream_keys: unknown backend {backend!r} (known: {names}).",
                               param=f"upstream_keys.{backend}")
        out[backend] = None if secret is None else vault.seal(secret)
    return out
