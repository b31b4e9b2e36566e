"""Registry authentication: challenges, stored credentials, the bearer-token flow.

* `parse_www_authenticate` reads RFC 7235 challenges (``Bearer realm=..,service=..,
  scope=..`` and ``Basic realm=..``); it never raises, unparseable parts are skipped.
* `load_docker_credentials` finds ``user:pass`` for a registry in Docker's
  ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``; ``$REGISTRY_AUTH_FILE`` as
  the containers-tools fallback).  Credential helpers (``credsStore``) are not run.
* `fetch_bearer_token` performs the distribution token flow: GET the realm with
  ``service`` and ``scope`` parameters (basic credentials if any), or POST the
  OAuth2 refresh-token grant when the config holds an identity token.
* `credentials_withheld` is the rule for which realms may see those credentials: the
  registry's own host name (any port) over https, or over http only when the registry
  itself is plain http (a loopback test registry); anything else gets an anonymous
  token request.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from erofs_nydus.errors import AuthError, RegistryError

_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68_EXTRA = frozenset("/")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One authentication challenge; `scheme` is lower-case, param names too."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)
    token68: str | None = None

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value into its challenges (possibly several)."""
    challenges: list[Challenge] = []
    scheme: str | None = None
    params: dict[str, str] = {}
    token68: str | None = None
    i, n = 0, len(header)

    def flush() -> None:
        if scheme:
            challenges.append(Challenge(scheme.lower(), dict(params), token68))

    while i < n:
        saw_comma = False
        while i < n and header[i] in " \t,":
            saw_comma = saw_comma or header[i] == ","
            i += 1
        if i >= n:
            break
        start = i
        while i < n and (header[i] in _TCHARS or header[i] in _TOKEN68_EXTRA):
            i += 1
        word = header[start:i]
        if not word:
            i += 1  # stray character: skip it
            continue
        j = i
        while j < n and header[j] in " \t":
            j += 1
        if scheme is not None and j < n and header[j] == "=":
            # token68 ("abc==") directly after the scheme, or an auth-param.
            k = j
            while k < n and header[k] == "=":
                k += 1
            rest = header[k:].lstrip(" \t")
            if not params and token68 is None and (not rest or rest[0] == ","):
                token68 = word + header[j:k]
                i = k
                continue
            i = j + 1
            while i < n and header[i] in " \t":
                i += 1
            if i < n and header[i] == '"':
                i += 1
                value: list[str] = []
                while i < n and header[i] != '"':
                    if header[i] == "\\" and i + 1 < n:
                        i += 1
                    value.append(header[i])
                    i += 1
                i += 1  # closing quote (or end)
                params[word.lower()] = "".join(value)
            else:
                vstart = i
                while i < n and header[i] not in ", \t":
                    i += 1
                params[word.lower()] = header[vstart:i]
            continue
        if (
            scheme is not None
            and not params
            and token68 is None
            and not saw_comma
            and (j >= n or header[j] == ",")
        ):
            token68 = word  # "Scheme token68" without padding
            i = j
            continue
        flush()
        scheme, params, token68 = word, {}, None
        i = j
    flush()
    return challenges


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str
    identity_token: str | None = None  # OAuth2 refresh token ("identitytoken" in config.json)
    # a bearer token sent as is ("registrytoken" in config.json, nydusd's registry_token)
    registry_token: str | None = None

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(username={self.username!r}, password=***)"


_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


def normalize_registry_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``http://h:5000/v2/`` -> ``h:5000``."""
    k = key.strip()
    for prefix in ("https://", "http://"):
        if k.lower().startswith(prefix):
            k = k[len(prefix) :]
    k = k.split("/", 1)[0].lower()
    return "docker.io" if k in _HUB_ALIASES else k


def credentials_from_config(config: Mapping[str, object], registry: str) -> Credentials | None:
    """Pure: pick `registry`'s entry out of a parsed config.json."""
    auths = config.get("auths")
    if not isinstance(auths, dict):
        return None
    want = normalize_registry_key(registry)
    for key, entry in auths.items():
        if not isinstance(key, str) or normalize_registry_key(key) != want:
            continue
        if not isinstance(entry, dict):
            continue
        identity = entry.get("identitytoken")
        identity = identity if isinstance(identity, str) and identity else None
        token = entry.get("registrytoken")
        token = token if isinstance(token, str) and token else None
        auth = entry.get("auth")
        if isinstance(auth, str) and auth:
            try:
                decoded = base64.b64decode(auth, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                raise AuthError(
                    f"docker config: 'auth' for {key} is not base64 user:pass"
                ) from None
            user, sep, password = decoded.partition(":")
            if not sep:
                raise AuthError(f"docker config: 'auth' for {key} lacks the ':' in user:pass")
            return Credentials(user, password, identity, token)
        user_v, pass_v = entry.get("username"), entry.get("password")
        if isinstance(user_v, str) and isinstance(pass_v, str):
            return Credentials(user_v, pass_v, identity, token)
        if identity or token:
            return Credentials("<token>", "", identity, token)
    return None


def docker_config_paths(environ: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if environ is None else environ
    paths: list[Path] = []
    if env.get("DOCKER_CONFIG"):
        paths.append(Path(env["DOCKER_CONFIG"]) / "config.json")
    else:
        home = env.get("HOME") or os.path.expanduser("~")
        paths.append(Path(home) / ".docker" / "config.json")
    if env.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(env["REGISTRY_AUTH_FILE"]))
    return paths


def load_docker_credentials(
    registry: str,
    *,
    config_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Credentials | None:
    """Credentials for `registry` from Docker's config (or `config_path`: a file or a dir)."""
    if config_path is not None:
        p = Path(config_path)
        paths = [p / "config.json" if p.is_dir() else p]
    else:
        paths = docker_config_paths(environ)
    for path in paths:
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise AuthError(f"cannot read docker config {path}: {exc.strerror}") from exc
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise AuthError(f"docker config {path} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise AuthError(f"docker config {path} is not a JSON object")
        creds = credentials_from_config(config, registry)
        if creds is not None:
            return creds
    return None


def repository_scope(repository: str, actions: Iterable[str] = ("pull",)) -> str:
    return f"repository:{repository}:{','.join(actions)}"


def merge_scopes(*groups: Iterable[str] | str | None) -> list[str]:
    """Union of scope strings (space separated in challenges), merging actions per resource."""
    merged: dict[tuple[str, str], list[str]] = {}
    for group in groups:
        if group is None:
            continue
        items = group.split() if isinstance(group, str) else list(group)
        for item in items:
            for scope in item.split():
                rtype, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                if not name:  # not type:name:actions; keep verbatim
                    merged.setdefault((scope, ""), [])
                    continue
                acts = merged.setdefault((rtype, name), [])
                for a in actions.split(","):
                    if a and a not in acts:
                        acts.append(a)
    out = []
    for (rtype, name), acts in merged.items():
        out.append(f"{rtype}:{name}:{','.join(acts)}" if name else rtype)
    return sorted(out)


@dataclass(frozen=True, slots=True)
class BearerToken:
    token: str
    expires_at: float  # time.monotonic() deadline

    def valid(self, margin: float = 5.0) -> bool:
        return time.monotonic() + margin < self.expires_at


# Token realms that may see a registry's credentials although their host name differs:
# Docker Hub serves its API from registry-1.docker.io and its tokens from auth.docker.io.
REALM_HOST_ALIASES: Mapping[str, frozenset[str]] = {
    "registry-1.docker.io": frozenset({"auth.docker.io"}),
}


def credentials_withheld(realm: str, registry_url: str) -> str | None:
    """Why credentials must not go to the token `realm` a registry named, or None.

    The registry's 401 names the realm, so a registry (or whoever answers in its name)
    could otherwise collect our password for any host.  The rule:

    * the realm's host name must be the registry's own (any port; Docker Hub's
      auth.docker.io counts as its registry's, `REALM_HOST_ALIASES`);
    * the realm must be https, unless the registry itself is spoken to over plain
      http (`plain_http`, or "loopback" for a test registry on 127.0.0.1): then the
      same host's http realm learns nothing the registry connection did not already
      carry in clear.  An https registry never sends credentials to an http realm.

    `registry_url`: ``scheme://host[:port]`` the client uses for the registry.
    """
    try:
        r, reg = httpx.URL(realm), httpx.URL(registry_url)
    except (httpx.InvalidURL, TypeError):
        return f"token realm {realm!r} is not a URL"
    realm_host, reg_host = r.host.lower(), reg.host.lower()
    if realm_host != reg_host and realm_host not in REALM_HOST_ALIASES.get(reg_host, ()):
        return f"token realm {realm} is on another host than the registry {reg_host}"
    if r.scheme != "https" and reg.scheme == "https":
        return f"token realm {realm} is plain http while the registry is https"
    if r.scheme not in ("http", "https"):
        return f"token realm {realm} is neither http nor https"
    return None


def token_request(
    challenge: Challenge, scopes: Sequence[str], credentials: Credentials | None
) -> httpx.Request:
    """Pure: the HTTP request that asks `challenge.realm` for a token covering `scopes`."""
    realm = challenge.realm
    if not realm or not realm.lower().startswith(("http://", "https://")):
        raise AuthError(f"bearer challenge has no usable realm: {realm!r}")
    service = challenge.service
    if credentials is not None and credentials.identity_token:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": credentials.identity_token,
            "client_id": "erofs-nydus",
            "scope": " ".join(scopes),
        }
        if service:
            form["service"] = service
        return httpx.Request("POST", realm, data=form)
    params: list[tuple[str, str | int | float | bool | None]] = []
    if service:
        params.append(("service", service))
    params.extend(("scope", s) for s in scopes)
    headers = {}
    if credentials is not None:
        params.append(("account", credentials.username))
        headers["Authorization"] = credentials.basic_header()
    return httpx.Request("GET", httpx.URL(realm).copy_merge_params(params), headers=headers)


def parse_token_response(body: bytes, *, now: float | None = None) -> BearerToken:
    """Pure: read ``token`` / ``access_token`` and ``expires_in`` (default 60 s)."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AuthError("token server answered with invalid JSON") from None
    if not isinstance(obj, dict):
        raise AuthError("token server answered with a non-object")
    token = obj.get("token") or obj.get("access_token")
    if not isinstance(token, str) or not token:
        raise AuthError("token server answer carries no token")
    expires_in = obj.get("expires_in")
    if not isinstance(expires_in, int | float) or expires_in <= 0:
        expires_in = 60
    start = time.monotonic() if now is None else now
    return BearerToken(token, start + float(expires_in))


def fetch_bearer_token(
    send: Callable[[httpx.Request], httpx.Response],
    challenge: Challenge,
    scopes: Sequence[str],
    credentials: Credentials | None,
) -> BearerToken:
    """Run the token flow; `send` performs one request (with the caller's retries/timeouts)."""
    request = token_request(challenge, scopes, credentials)
    response = send(request)
    if response.status_code in (401, 403):
        who = f"user {credentials.username!r}" if credentials else "anonymous access"
        raise AuthError(
            f"token server {challenge.realm} refused {who} for {' '.join(scopes) or 'no scope'}"
            f" (HTTP {response.status_code})"
        )
    if response.status_code != 200:
        raise RegistryError(f"token server {challenge.realm} answered HTTP {response.status_code}")
    return parse_token_response(response.content)
