"""Bearer JWTs of devices and administrators.

HS256 with a shared secret (``FIELDSYNC_GATEWAY_JWT_SECRET``) and/or RS256/ES256 with the keys of
a JWKS file or URL (``FIELDSYNC_GATEWAY_JWKS``, keys chosen by ``kid``). ``aud`` must be the
configured audience, ``iss`` the configured issuer when one is set, ``exp`` is required; the
algorithm comes from the configuration, never from the token (so ``alg=none`` and an HS256 token
"signed" with a public RSA key are refused).

Claims: ``org`` (the organisation, or ``*`` for an administrator of every org), ``sub`` (the
user), ``roles`` (security roles), optionally ``teams``, and ``scope`` containing
``fieldsync:admin`` for the admin API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWKClient, PyJWKSet

from engine.config import Settings
from engine.exceptions import ConfigError

ADMIN_SCOPE = "fieldsync:admin"
ASYMMETRIC = ["RS256", "ES256"]


class Unauthorized(Exception):
    """No acceptable token: 401."""


class Forbidden(Exception):
    """A valid token that does not grant this: 403."""


@dataclass(frozen=True)
class Principal:
    org: str
    user: str
    roles: tuple[str, ...]
    teams: tuple[str, ...]
    admin: bool

    def may_use(self, org: str) -> bool:
        return self.org == org or (self.admin and self.org == "*")


class Authenticator:
    """Verifies bearer tokens with the configured keys."""

    def __init__(self, settings: Settings, *, dev_secret: str | None = None) -> None:
        self._secret = (
            settings.gateway_jwt_secret.get_secret_value()
            if settings.gateway_jwt_secret
            else dev_secret
        )
        self._audience = settings.gateway_jwt_audience
        self._issuer = settings.gateway_jwt_issuer
        self._jwks_client: PyJWKClient | None = None
        self._jwks_set: PyJWKSet | None = None
        source = settings.gateway_jwks
        if source:
            if source.startswith(("https://", "http://")):
                self._jwks_client = PyJWKClient(source, cache_keys=True, lifespan=300)
            else:
                try:
                    self._jwks_set = PyJWKSet.from_json(Path(source).read_text())
                except (OSError, jwt.PyJWTError, ValueError) as error:
                    raise ConfigError(
                        f"FIELDSYNC_GATEWAY_JWKS: cannot load {source}: {error}"
                    ) from None
        if not self._secret and not source:
            raise ConfigError(
                "FIELDSYNC_GATEWAY_JWT_SECRET or FIELDSYNC_GATEWAY_JWKS must be set: "
                "the gateway cannot verify device tokens without a key"
            )

    def _key(self, token: str, header: dict[str, Any]) -> tuple[Any, list[str]]:
        alg = header.get("alg")
        if alg == "HS256":
            if not self._secret:
                raise Unauthorized("HS256 tokens are not accepted here")
            return self._secret, ["HS256"]
        if alg not in ASYMMETRIC:
            raise Unauthorized(f"token algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        try:
            if self._jwks_client is not None:
                return self._jwks_client.get_signing_key_from_jwt(token).key, [alg]
            if self._jwks_set is not None:
                for key in self._jwks_set.keys:
                    if kid is None or key.key_id == kid:
                        return key.key, [alg]
        except jwt.PyJWTError as error:
            raise Unauthorized(f"no key for this token: {error}") from None
        raise Unauthorized(f"no key with kid {kid!r}")

    def verify(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("missing bearer token")
        token = authorization[7:].strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise Unauthorized(f"malformed token: {error}") from None
        key, algorithms = self._key(token, header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub", "org"]},
                leeway=30,
            )
        except jwt.PyJWTError as error:
            raise Unauthorized(f"token rejected: {error}") from None
        roles, teams = claims.get("roles", []), claims.get("teams", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthorized("claim 'roles' must be a list of strings")
        if not isinstance(teams, list) or not all(isinstance(t, str) for t in teams):
            raise Unauthorized("claim 'teams' must be a list of strings")
        scope = claims.get("scope", "")
        return Principal(
            org=str(claims["org"]),
            user=str(claims["sub"]),
            roles=tuple(roles),
            teams=tuple(teams),
            admin=ADMIN_SCOPE in (scope.split() if isinstance(scope, str) else scope),
        )


__all__ = ["ADMIN_SCOPE", "Authenticator", "Forbidden", "Principal", "Unauthorized"]
