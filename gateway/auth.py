"""Bearer JWTs of devices and administrators.

HS256 with a shared secret (``FIELDSYNC_GATEWAY_JWT_SECRET``) and/or RS256/ES256 with the keys of
a JWKS file or URL (``FIELDSYNC_GATEWAY_JWKS``, keys chosen by ``kid``). ``aud`` must be the
configured audience, ``iss`` the configured issuer when one is set, ``exp``, ``sub`` and ``org``
are required, and a token may not live longer than ``FIELDSYNC_GATEWAY_JWT_MAX_LIFETIME_S``. The
algorithm comes from the configuration and the key, never from the token alone (so ``alg=none``
and an HS256 token "signed" with a public RSA key are refused).

A JWKS URL is read through :class:`JwksCache`: keys are refetched once they are older than
``FIELDSYNC_GATEWAY_JWKS_CACHE_S``, and early for an unknown ``kid``, but never more than once per
``FIELDSYNC_GATEWAY_JWKS_MIN_REFETCH_S`` — a flood of made-up ``kid``-s costs one fetch.

Every refusal is an :class:`Unauthorized` with a stable ``code`` (``token_expired``,
``bad_signature``, …; see ``docs/protocol.md``).

Claims: ``org`` (the organisation, or ``*`` for an administrator of every org), ``sub`` (the
user), ``roles`` (security roles), optionally ``teams``, and ``scope`` containing
``fieldsync:admin`` for the admin API.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
from jwt import PyJWK, PyJWKSet

from engine.config import Settings
from engine.exceptions import ConfigError

log = logging.getLogger("fieldsync.gateway.auth")

ADMIN_SCOPE = "fieldsync:admin"
KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}  # accepted asymmetric algorithms → JWK key type
ASYMMETRIC = list(KEY_TYPES)
LEEWAY_S = 30
ORG_CLAIM = re.compile(r"^([a-z][a-z0-9_]{0,39}|\*)$")


class Unauthorized(Exception):
    """No acceptable token: 401 with a stable ``code`` and a message."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class Forbidden(Exception):
    """A valid token that does not grant this: 403."""


class KeysUnavailable(Exception):
    """The JWKS URL could not be read and no keys are known yet: 503."""


@dataclass(frozen=True)
class Principal:
    org: str
    user: str
    roles: tuple[str, ...]
    teams: tuple[str, ...]
    admin: bool

    def may_use(self, org: str) -> bool:
        return self.org == org or (self.admin and self.org == "*")


def parse_jwks(document: bytes | str) -> list[PyJWK]:
    """The usable keys of a JWKS document (an empty ``keys`` list is a valid, empty set)."""
    data = orjson.loads(document)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS: expected an object with a 'keys' list")
    if not data["keys"]:
        return []
    return list(PyJWKSet.from_dict(data).keys)


class JwksCache:
    """The keys of a JWKS URL, fetched on demand and kept for ``ttl_s``.

    A lookup refetches when the keys are older than ``ttl_s`` or the ``kid`` is unknown, but two
    fetches are always at least ``min_refetch_s`` apart. A failed fetch keeps the keys known so
    far (logged); with none known yet, :class:`KeysUnavailable`.
    """

    def __init__(
        self,
        url: str,
        ttl_s: float,
        min_refetch_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.min_refetch_s = min_refetch_s
        self.fetches = 0
        self._clock = clock
        self._timeout_s = timeout_s
        self._keys: list[PyJWK] | None = None
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch, successful or not
        self._lock = threading.Lock()

    def keys(self, kid: str | None) -> list[PyJWK]:
        """The current keys, refreshed first if stale or if none has ``kid``."""
        with self._lock:
            now = self._clock()
            stale = self._fetched_at is None or now - self._fetched_at >= self.ttl_s
            if stale or not any(k.key_id == kid for k in self._keys or ()):
                may_fetch = (
                    self._attempted_at is None or now - self._attempted_at >= self.min_refetch_s
                )
                if may_fetch:
                    self._refresh(now)
            if self._keys is None:
                raise KeysUnavailable(f"the token keys at {self.url} could not be read yet")
            return list(self._keys)

    def _refresh(self, now: float) -> None:
        self._attempted_at = now
        self.fetches += 1
        try:
            response = httpx.get(self.url, timeout=self._timeout_s)
            response.raise_for_status()
            keys = parse_jwks(response.content)
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as error:
            log.warning("cannot refresh the JWKS from %s: %s", self.url, error)
            return
        self._keys, self._fetched_at = keys, now


class Authenticator:
    """Verifies bearer tokens with the configured keys."""

    def __init__(
        self,
        settings: Settings,
        *,
        dev_secret: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._secret = (
            settings.gateway_jwt_secret.get_secret_value()
            if settings.gateway_jwt_secret
            else dev_secret
        )
        self._audience = settings.gateway_jwt_audience
        self._issuer = settings.gateway_jwt_issuer
        self._max_lifetime = settings.gateway_jwt_max_lifetime_s
        self.jwks: JwksCache | None = None
        self._static_keys: list[PyJWK] | None = None
        source = settings.gateway_jwks
        if source:
            if source.startswith(("https://", "http://")):
                self.jwks = JwksCache(
                    source,
                    settings.gateway_jwks_cache_s,
                    settings.gateway_jwks_min_refetch_s,
                    clock=clock,
                )
            else:
                try:
                    self._static_keys = parse_jwks(Path(source).read_bytes())
                except (OSError, jwt.PyJWTError, ValueError) as error:
                    raise ConfigError(
                        f"FIELDSYNC_GATEWAY_JWKS: cannot load {source}: {error}"
                    ) from None
        if not self._secret and not source:
            raise ConfigError(
                "FIELDSYNC_GATEWAY_JWT_SECRET or FIELDSYNC_GATEWAY_JWKS must be set: "
                "the gateway cannot verify device tokens without a key"
            )

    def _accepted(self) -> str:
        return ", ".join((["HS256"] if self._secret else []) + (ASYMMETRIC if self._keyed else []))

    @property
    def _keyed(self) -> bool:
        return self.jwks is not None or self._static_keys is not None

    def _key(self, header: dict[str, Any]) -> Any:
        alg = header.get("alg")
        if alg == "HS256" and self._secret:
            return self._secret
        if not isinstance(alg, str) or alg not in KEY_TYPES or not self._keyed:
            raise Unauthorized(
                "bad_algorithm",
                f"token algorithm {alg!r} is not accepted here; accepted: {self._accepted()}",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("malformed_token", "token header 'kid' must be a string")
        keys: Sequence[PyJWK] = (
            self.jwks.keys(kid) if self.jwks is not None else self._static_keys or []
        )
        if kid is None:
            if len(keys) != 1:
                raise Unauthorized(
                    "unknown_key",
                    f"token has no 'kid' and there are {len(keys)} keys to choose from",
                )
            key = keys[0]
        else:
            found = [k for k in keys if k.key_id == kid]
            if not found:
                raise Unauthorized("unknown_key", f"no key with kid {kid!r}")
            key = found[0]
        if key.key_type != KEY_TYPES[alg] or key.algorithm_name != alg:
            raise Unauthorized(
                "bad_algorithm",
                f"key {kid!r} is for {key.algorithm_name}; the token says {alg}",
            )
        return key.key

    def verify(self, authorization: str | None) -> Principal:
        """The token's principal, or :class:`Unauthorized` naming why not."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized(
                "missing_token", "missing bearer token (Authorization: Bearer <token>)"
            )
        token = authorization[7:].strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise Unauthorized("malformed_token", f"malformed token: {error}") from None
        key = self._key(header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[header["alg"]],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub", "org"]},
                leeway=LEEWAY_S,
            )
        except jwt.PyJWTError as error:
            raise _refusal(error) from None
        return self._principal(claims)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        exp, iat = int(claims["exp"]), claims.get("iat")  # PyJWT checked both convert
        lifetime = exp - int(iat) if iat is not None else exp - time.time() - LEEWAY_S
        if lifetime > self._max_lifetime:
            raise Unauthorized(
                "lifetime_too_long",
                f"token lifetime {lifetime:.0f} s exceeds the {self._max_lifetime:.0f} s allowed"
                " (exp - iat, or exp - now without iat)",
            )
        org, sub = claims["org"], claims["sub"]
        if not isinstance(org, str) or not ORG_CLAIM.match(org):
            raise Unauthorized("bad_claim", "claim 'org' must be an organisation name or '*'")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("bad_claim", "claim 'sub' must be a non-empty string")
        roles, teams = claims.get("roles", []), claims.get("teams", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthorized("bad_claim", "claim 'roles' must be a list of strings")
        if not isinstance(teams, list) or not all(isinstance(t, str) for t in teams):
            raise Unauthorized("bad_claim", "claim 'teams' must be a list of strings")
        scope = claims.get("scope", "")
        scopes = scope.split() if isinstance(scope, str) else scope
        return Principal(
            org=org,
            user=sub,
            roles=tuple(roles),
            teams=tuple(teams),
            admin=isinstance(scopes, list) and ADMIN_SCOPE in scopes,
        )


def _refusal(error: jwt.PyJWTError) -> Unauthorized:
    """PyJWT's verdict as a coded refusal."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return Unauthorized("token_expired", "token has expired")
    if isinstance(error, jwt.ImmatureSignatureError):
        return Unauthorized("token_not_yet_valid", f"token is not valid yet: {error}")
    if isinstance(error, jwt.MissingRequiredClaimError):
        return Unauthorized("missing_claim", f"token has no {error.claim!r} claim")
    if isinstance(error, jwt.InvalidAudienceError):
        return Unauthorized("bad_audience", f"token audience is not accepted: {error}")
    if isinstance(error, jwt.InvalidIssuerError):
        return Unauthorized("bad_issuer", f"token issuer is not accepted: {error}")
    if isinstance(error, jwt.InvalidSignatureError):
        return Unauthorized("bad_signature", "token signature does not verify")
    if isinstance(error, jwt.InvalidAlgorithmError | jwt.InvalidKeyError):
        return Unauthorized("bad_algorithm", f"token algorithm or key refused: {error}")
    if isinstance(error, jwt.DecodeError):
        return Unauthorized("malformed_token", f"malformed token: {error}")
    return Unauthorized("bad_claim", f"token rejected: {error}")


__all__ = [
    "ADMIN_SCOPE",
    "Authenticator",
    "Forbidden",
    "JwksCache",
    "KeysUnavailable",
    "Principal",
    "Unauthorized",
    "parse_jwks",
]
