"""The compose topology (compose/), the Dockerfile and docs/operations.md, checked without a
Docker engine.

* compose.yml, interpolated with compose/.env.example, validates against the compose
  specification's JSON schema (compose/compose-spec.json, from compose-spec/compose-go);
  references between services, volumes and secrets resolve; healthy-conditions have healthchecks.
* Every ``FIELDSYNC_*`` name in the compose files, the Dockerfile and the operator docs is a
  setting of :class:`engine.config.Settings`; every FieldSync service's environment and secrets
  load into valid settings that point at the compose broker and staging (not the embedded ones).
* Every ``fieldsync …`` command (service commands, commands in comments and docs) exists in the
  CLI with the options it is given; the Dockerfile's entrypoint is the declared console script.
* HAProxy balances, in TCP mode, exactly the devices' gateways on their ports; Prometheus
  scrapes every gateway and projector on ports that are really served; metric names in the docs
  are the ones the code registers.
* The Debezium profile writes the topics the Debezium org file maps, none of them in FieldSync's
  own topic namespace.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import shlex
import tomllib
from collections import defaultdict
from collections.abc import Iterator, Mapping
from copy import deepcopy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer.main
import yaml

import engine.cli
from engine.config import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
COMPOSE_FILE = COMPOSE / "compose.yml"
ENV_EXAMPLE = COMPOSE / ".env.example"
HAPROXY_CFG = COMPOSE / "haproxy.cfg"
PROMETHEUS_YML = COMPOSE / "prometheus.yml"
CONNECTOR_JSON = COMPOSE / "debezium" / "connector.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
OPERATIONS_MD = ROOT / "docs" / "operations.md"
COMPOSE_README = COMPOSE / "README.md"

SETTING_NAME = re.compile(r"\bFIELDSYNC_[A-Z0-9]+(?:_[A-Z0-9]+)*")
METRIC_NAME = re.compile(r"\bfieldsync_(?:projector|gateway)_[a-z0-9_]*[a-z0-9]")
PASSWORD_IN_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")


# -- reading the files ----------------------------------------------------------------------


class MissingVariable(LookupError):
    pass


_VARIABLE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_]\w*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_]\w*)(?:(?P<colon>:?)(?P<op>[-?+])(?P<arg>.*))?", re.S)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``,
    ``${VAR:?e}``, ``${VAR?e}``, ``${VAR:+r}``, ``${VAR+r}``. A variable without a default that
    is not set is an error here (Compose would substitute an empty string with a warning)."""

    def substitute(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        if match["bare"]:
            if match["bare"] not in env:
                raise MissingVariable(match["bare"])
            return env[match["bare"]]
        braced = _BRACED.fullmatch(match["braced"])
        assert braced, f"unsupported interpolation ${{{match['braced']}}}"
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        value = env.get(name)
        unset = value is None or (bool(braced["colon"]) and value == "")
        if op is None or op == "?":
            if value is None or (op == "?" and unset):
                raise MissingVariable(name)
            return value
        if op == "-":
            return interpolate(arg, env) if unset else str(value)
        return "" if unset else interpolate(arg, env)

    return _VARIABLE.sub(substitute, text)


def read_env_file(path: Path) -> dict[str, str]:
    """A Compose ``.env`` file: ``KEY=value`` lines, comments, quotes, interpolation."""
    env: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_]\w*", key), f"{path}:{number}: not KEY=value"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            env[key] = value[1:-1]
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        else:
            value = re.split(r"\s#", value, maxsplit=1)[0].rstrip()
        env[key] = interpolate(value, env)
    return env


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


@cache
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@cache
def raw_compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@cache
def _compose() -> dict[str, Any]:
    interpolated = _interpolate_tree(raw_compose(), example_env())
    assert isinstance(interpolated, dict)
    return interpolated


def compose() -> dict[str, Any]:
    """compose.yml as Compose sees it with .env copied from .env.example (a fresh copy)."""
    return deepcopy(_compose())


def services(*, all_profiles: bool = True) -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    return {n: s for n, s in found.items() if all_profiles or not s.get("profiles")}


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def secret_names(service: Mapping[str, Any]) -> list[str]:
    return [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]


def as_args(command: str | list[str] | None) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


@cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_final_stage() -> list[tuple[str, str]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, arguments))
    return stages[-1]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in dockerfile_final_stage():
        if keyword == "ENV":
            for item in shlex.split(arguments):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {item!r}: use KEY=value"
                env[key] = value
    return env


def dockerfile_entrypoint() -> list[str]:
    entrypoints = [a for k, a in dockerfile_final_stage() if k == "ENTRYPOINT"]
    assert entrypoints, "the Dockerfile's final stage has no ENTRYPOINT"
    value = json.loads(entrypoints[-1])  # exec form: no shell between docker and fieldsync
    assert isinstance(value, list)
    return [str(v) for v in value]


def uses_fieldsync_image(service: Mapping[str, Any]) -> bool:
    build = service.get("build")
    if not build:
        return False
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return (COMPOSE / context).resolve() == ROOT and (ROOT / dockerfile) == DOCKERFILE


def fieldsync_args(service: Mapping[str, Any]) -> list[str] | None:
    """The ``fieldsync`` arguments a service runs, or None when it does not run FieldSync."""
    if not uses_fieldsync_image(service):
        return None
    entrypoint = as_args(service["entrypoint"]) if "entrypoint" in service else None
    if entrypoint is not None and entrypoint != dockerfile_entrypoint():
        return None
    return as_args(service.get("command"))


def fieldsync_services(role: str, *, all_profiles: bool = True) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in services(all_profiles=all_profiles).items()
        if (fieldsync_args(service) or [None])[0] == role
    }


def setting_default(name: str) -> Any:
    return Settings.model_fields[name].default


def gateway_port(service: Mapping[str, Any]) -> int:
    return int(environment(service).get("FIELDSYNC_GATEWAY_PORT", setting_default("gateway_port")))


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def host_path(service: Mapping[str, Any], container_path: str) -> Path | None:
    """The file of this repository that a bind mount shows at ``container_path``."""
    for volume in service.get("volumes", []):
        source, target = (
            (volume.split(":")[:2])
            if isinstance(volume, str)
            else (
                volume.get("source", ""),
                volume["target"],
            )
        )
        if not source.startswith((".", "/")):
            continue  # a named volume
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return (COMPOSE / source / Path(container_path).relative_to(target)).resolve()
    return None


# -- the CLI ----------------------------------------------------------------------------------


@cache
def cli_root() -> Any:
    return typer.main.get_command(engine.cli.app)


def resolve_cli(args: list[str], where: str) -> Any:
    """The CLI command ``fieldsync <args>`` runs; fails naming the first unknown subcommand
    or option."""
    command = cli_root()
    path = ["fieldsync"]
    rest = list(args)
    while hasattr(command, "commands"):  # a group: the next word names a subcommand
        if rest[:1] == ["--help"]:
            return command
        assert rest, f"{where}: `{' '.join(path)}` needs a subcommand"
        name = rest.pop(0)
        assert name in command.commands, (
            f"{where}: `{' '.join(path)}` has no subcommand {name!r} "
            f"(it has {', '.join(sorted(command.commands))})"
        )
        path.append(name)
        command = command.commands[name]
    options = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for token in rest:
        option = token.split("=", 1)[0]
        if option.startswith("-") and option != "-":
            assert option in options, f"{where}: `{' '.join(path)}` has no option {option}"
    return command


_SHELL_STOP = re.compile(r"\s*(?:\|\||&&|[|;&)#`\"'\\]|$)")


def commands_in(text: str) -> Iterator[list[str]]:
    """The arguments of every ``fieldsync …`` command line written in ``text``."""
    for line in text.splitlines():
        for match in re.finditer(r"(?<![\w./$-])fieldsync[ \t]+(?=[a-z-])", line):
            tail = line[match.end() :]
            stop = _SHELL_STOP.search(tail)
            words = tail[: stop.start() if stop else None].replace("[", " ").replace("]", " ")
            yield words.split()


def markdown_code(path: Path) -> str:
    """Fenced blocks and inline code spans of a Markdown file."""
    text = path.read_text()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", prose)
    return "\n".join([*blocks, *spans])


# -- prometheus metrics of the code ---------------------------------------------------------


def registered_metric_names() -> set[str]:
    """Every series name the projector and gateway metrics can expose."""
    from engine.projections.metrics import METRICS as PROJECTOR
    from gateway.metrics import GatewayMetrics

    suffixes = {
        "counter": ("", "_total", "_created"),
        "histogram": ("", "_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for metric in [*vars(PROJECTOR).values(), *vars(GatewayMetrics()).values()]:
        if hasattr(metric, "describe"):
            for family in metric.describe():
                names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


# -- settings ---------------------------------------------------------------------------------


def known_settings() -> set[str]:
    names = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    # read by load_settings itself, before the settings exist: the secrets directory
    if "{ENV_PREFIX}SECRETS_DIR" in inspect.getsource(load_settings):
        names.add(f"{ENV_PREFIX}SECRETS_DIR")
    return names


SETTING_SOURCES = [
    COMPOSE_FILE,
    ENV_EXAMPLE,
    PROMETHEUS_YML,
    HAPROXY_CFG,
    DOCKERFILE,
    COMPOSE_README,
    OPERATIONS_MD,
]


@pytest.mark.parametrize("path", SETTING_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_fieldsync_variable_is_a_setting(path: Path) -> None:
    named = set(SETTING_NAME.findall(path.read_text()))
    unknown = sorted(named - known_settings())
    assert not unknown, f"{path.relative_to(ROOT)} names settings that do not exist: {unknown}"


def test_known_settings_come_from_the_code() -> None:
    known = known_settings()
    assert "FIELDSYNC_PROJECTOR_METRICS_PORT" in known
    assert "FIELDSYNC_SECRETS_DIR" in known
    assert "FIELDSYNC_NO_SUCH_SETTING" not in known


def test_secret_files_are_named_after_settings() -> None:
    """FIELDSYNC_SECRETS_DIR provides a setting from the file named after its variable: a
    ``fieldsync_*`` secret that names no setting would be silently ignored."""
    declared = compose()["secrets"]
    for name, service in services().items():
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            target = source if isinstance(secret, str) else secret.get("target", source)
            assert source in declared, f"{name}: secret {source} is not declared"
            if target.lower().startswith("fieldsync_"):
                assert target.upper() in known_settings(), f"{name}: {target} is no setting"


def test_secrets_dir_provides_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mechanism compose relies on: a file named like the variable, in lowercase."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "fieldsync_staging_dsn").write_text("postgresql://u:p@staging:5432/db\n")
    monkeypatch.setenv("FIELDSYNC_SECRETS_DIR", str(secrets))
    settings = load_settings()
    assert settings.staging_dsn is not None
    assert settings.staging_dsn.get_secret_value() == "postgresql://u:p@staging:5432/db"


# -- compose.yml --------------------------------------------------------------------------------


@cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((COMPOSE / "compose-spec.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator: jsonschema.protocols.Validator = validator_class(schema)
    return validator


def test_compose_file_validates_against_the_compose_spec() -> None:
    problems = [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in compose_validator().iter_errors(compose())
    ]
    assert not problems, "compose.yml does not validate:\n" + "\n".join(problems)


def test_the_compose_schema_rejects_mistakes() -> None:
    """The vendored schema is strict enough to matter (not an empty or permissive schema)."""
    typo = compose()
    typo["services"]["kafka"]["healthchek"] = typo["services"]["kafka"].pop("healthcheck")
    assert not compose_validator().is_valid(typo)
    bad_condition = compose()
    bad_condition["services"]["projector-1"]["depends_on"]["kafka"]["condition"] = "healthy"
    assert not compose_validator().is_valid(bad_condition)


def test_every_variable_without_default_is_in_env_example() -> None:
    try:
        _interpolate_tree(raw_compose(), example_env())
    except MissingVariable as missing:
        pytest.fail(f"compose.yml uses ${{{missing}}}: set it in .env.example or give a default")
    with pytest.raises(MissingVariable):  # and the check does catch a missing one
        _interpolate_tree({"image": "x:${TAG}", "ports": ["${P:-1}:1"]}, {})
    assert interpolate("${P:-8080}:$${Q}", {}) == "8080:${Q}"


def test_secrets_come_from_env_example_variables() -> None:
    env = example_env()
    for name, secret in compose()["secrets"].items():
        if "environment" in secret:
            assert env.get(secret["environment"]), (
                f"secret {name}: {secret['environment']} is not set in .env.example"
            )
        else:
            assert "file" in secret, f"secret {name}: from a variable of .env or a file"
            assert not Path(secret["file"]).is_absolute()


def test_references_resolve() -> None:
    document = compose()
    every = document["services"]
    named_volumes = set(document.get("volumes") or {})
    for name, service in every.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for target, rule in depends.items():
            assert target in every, f"{name} depends on unknown service {target}"
            if rule.get("condition") == "service_healthy":
                assert "healthcheck" in every[target], (
                    f"{name} waits for {target} to be healthy; {target} has no healthcheck"
                )
            if not every[target].get("profiles"):
                continue
            assert set(every[target]["profiles"]) <= set(service.get("profiles", [])), (
                f"{name} depends on {target}, which only exists in a profile"
            )
        mode = service.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.removeprefix("service:") in every, f"{name}: {mode} is unknown"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and source.startswith((".", "/")):
                assert (COMPOSE / source).exists(), f"{name}: bind mount {source} does not exist"
            elif source:
                assert source in named_volumes, f"{name}: volume {source} is not declared"
        for secret in secret_names(service):
            assert secret in document["secrets"], f"{name}: secret {secret} is not declared"


def test_no_plaintext_secrets_in_compose() -> None:
    text = COMPOSE_FILE.read_text()
    assert not PASSWORD_IN_URL.search(text), "a URL with a password in compose.yml"
    for name, service in services().items():
        for key, value in environment(service).items():
            if re.search(r"PASSWORD|SECRET|_DSN$", key) and key != f"{ENV_PREFIX}SECRETS_DIR":
                assert key.endswith("_FILE") and value.startswith("/run/secrets/"), (
                    f"{name}: {key} in the environment; pass it as a Docker secret"
                )


def test_fieldsync_services_load_valid_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each FieldSync service's environment, Dockerfile ENV and secret files (values from
    .env.example) make valid settings that use the compose broker and staging server."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    env = example_env()
    declared = compose()["secrets"]
    kafka = services()["kafka"]
    advertised = environment(kafka)["KAFKA_ADVERTISED_LISTENERS"]
    broker = {server.split("://", 1)[1] for server in advertised.split(",")}
    checked = 0
    for name, service in services().items():
        if fieldsync_args(service) is None:
            continue
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(key)
        secrets = tmp_path / name
        secrets.mkdir()
        for secret in secret_names(service):
            (secrets / secret).write_text(env[declared[secret]["environment"]])
        variables = {**dockerfile_env(), **environment(service)}
        assert variables.get(f"{ENV_PREFIX}SECRETS_DIR") == "/run/secrets", name
        variables[f"{ENV_PREFIX}SECRETS_DIR"] = str(secrets)
        for key, value in variables.items():
            if key.startswith(ENV_PREFIX):
                monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.bootstrap_servers is not None, f"{name}: would use the embedded broker"
        assert set(settings.bootstrap_servers.split(",")) <= broker, name
        assert settings.staging_dsn is not None, f"{name}: would use the embedded PostgreSQL"
        staging_host = re.search(r"@([^:/]+)", settings.staging_dsn.get_secret_value())
        assert staging_host and staging_host[1] in services(), f"{name}: staging host unknown"
        if fieldsync_args(service) == ["gateway"]:
            assert settings.gateway_host == "0.0.0.0", f"{name}: unreachable on loopback"
            assert settings.gateway_token_secret is not None, (
                f"{name}: gateways must share one FIELDSYNC_GATEWAY_TOKEN_SECRET"
            )
            assert settings.gateway_jwt_secret or settings.gateway_jwks, name
        checked += 1
    assert checked >= 6


def test_fieldsync_commands_exist() -> None:
    checked = 0
    for name, service in services().items():
        args = fieldsync_args(service)
        if args is not None:
            resolve_cli(args, f"compose.yml service {name}")
            checked += 1
    assert checked >= 6
    with pytest.raises(AssertionError, match="no subcommand"):
        resolve_cli(["projektor"], "self-check")
    with pytest.raises(AssertionError, match="no option"):
        resolve_cli(["projector", "--org-fil", "x"], "self-check")


@pytest.mark.parametrize(
    "path",
    [COMPOSE_FILE, HAPROXY_CFG, PROMETHEUS_YML, ENV_EXAMPLE],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_commands_in_comments_exist(path: Path) -> None:
    for args in commands_in(path.read_text()):
        resolve_cli(args, str(path.relative_to(ROOT)))


@pytest.mark.parametrize(
    "path", [COMPOSE_README, OPERATIONS_MD], ids=lambda p: str(p.relative_to(ROOT))
)
def test_commands_in_docs_exist(path: Path) -> None:
    commands = list(commands_in(markdown_code(path)))
    assert commands, f"{path.relative_to(ROOT)} shows no fieldsync command"
    for args in commands:
        resolve_cli(args, str(path.relative_to(ROOT)))


def test_roles_are_all_there() -> None:
    """The topology of the issue: provisioner/capture, two projectors, two devices' gateways
    behind HAProxy, an admin gateway, Kafka in KRaft mode, a logical-decoding source."""
    default = services(all_profiles=False)
    assert len(fieldsync_services("provisioner", all_profiles=False)) >= 1
    assert len(fieldsync_services("projector", all_profiles=False)) >= 2
    gateways = fieldsync_services("gateway", all_profiles=False)
    devices = [n for n, s in gateways.items() if not admin_enabled(s)]
    assert len(devices) >= 2
    kafka = environment(default["kafka"])
    assert default["kafka"]["image"].startswith("apache/kafka:")
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka


def admin_enabled(service: Mapping[str, Any]) -> bool:
    value = environment(service).get("FIELDSYNC_GATEWAY_ADMIN_ENABLED")
    return truthy(value) if value is not None else bool(setting_default("gateway_admin_enabled"))


def test_source_database_decodes_logically() -> None:
    """The host of the org's source DSN runs PostgreSQL with wal_level=logical."""
    dsn = example_env()["CRM_SOURCE_DSN"]
    host = re.search(r"@([^:/]+)", dsn)
    assert host, "CRM_SOURCE_DSN names no host"
    source = services()[host[1]]
    assert "wal_level=logical" in as_args(source.get("command")), (
        f"{host[1]} must run with wal_level=logical"
    )


def test_org_files_are_valid_and_their_secrets_mounted() -> None:
    from engine.provisioning.commands import command_from_file

    provisioners = fieldsync_services("provisioner")
    assert provisioners
    for name, service in provisioners.items():
        path = host_path(service, "/orgs/demo.yaml")
        assert path is not None and path.is_file(), f"{name}: /orgs/demo.yaml is not mounted"
        command = command_from_file("provision", path)
        assert command.spec is not None
        reference = command.spec.source_dsn_secret or ""
        assert reference.startswith("file:/run/secrets/"), "the source DSN is a secret reference"
        secret = reference.removeprefix("file:/run/secrets/")
        assert secret in secret_names(service), f"{name}: secret {secret} is not mounted"


# -- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    entrypoint = dockerfile_entrypoint()
    assert len(entrypoint) == 1 and entrypoint[0] in scripts, (
        f"ENTRYPOINT {entrypoint} is not a console script of pyproject.toml ({sorted(scripts)})"
    )
    module, _, attribute = scripts[entrypoint[0]].partition(":")
    assert (module, attribute) == ("engine.cli", "app"), "the CLI checked here is the script's"


def test_dockerfile_builds_the_package_as_non_root() -> None:
    instructions = dockerfile_instructions()
    froms = [a.split()[0] for k, a in instructions if k == "FROM"]
    assert len(froms) >= 2, "multi-stage: build, then a runtime stage"
    args = dict(
        a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a
    )  # ARG before the first FROM
    images = {interpolate(f, args) for f in froms}
    assert images == {"python:3.12-slim"}, images
    final = dockerfile_final_stage()
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert any(k == "RUN" and "pip install ." in a for k, a in instructions)


def test_docker_build_context_has_what_pyproject_builds() -> None:
    """Every package pyproject.toml includes and its readme are copied, and not ignored."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = set()
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY" and not arguments.startswith("--from"):
            words = [w for w in arguments.split() if not w.startswith("--")]
            copied.update(w.rstrip("/") for w in words[:-1])
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert needed <= copied, f"the Dockerfile does not copy {sorted(needed - copied)}"
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    for path in sorted(copied):
        assert (ROOT / path).exists(), f"COPY {path}: no such file"
        for pattern in ignored:
            assert not fnmatch.fnmatch(path, pattern.rstrip("/")), f"{path} is in .dockerignore"
    for pattern in (".venv", ".git", ".fieldsync"):
        assert pattern in ignored, f".dockerignore should leave out {pattern}"


# -- HAProxy ----------------------------------------------------------------------------------


def haproxy_sections() -> list[tuple[str, str, list[list[str]]]]:
    sections: list[tuple[str, str, list[list[str]]]] = []
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        words = line.split()
        if not raw[0].isspace():
            sections.append((words[0], words[1] if len(words) > 1 else "", []))
        else:
            assert sections, f"haproxy.cfg: {raw!r} outside a section"
            sections[-1][2].append(words)
    return sections


def haproxy_section(kind: str, name: str = "") -> list[list[str]]:
    for section_kind, section_name, lines in haproxy_sections():
        if section_kind == kind and section_name == name:
            return lines
    raise AssertionError(f"haproxy.cfg has no {kind} {name}")


def haproxy_value(lines: list[list[str]], *keyword: str) -> list[str] | None:
    for words in lines:
        if tuple(words[: len(keyword)]) == keyword:
            return words[len(keyword) :]
    return None


def seconds(value: str) -> float:
    """An HAProxy time (milliseconds without a unit)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s|m|h|d)?", value)
    assert match, f"not an HAProxy time: {value!r}"
    scale = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return float(match[1]) * scale[match[2]]


def bind_ports(lines: list[list[str]]) -> set[int]:
    return {int(words[1].rsplit(":", 1)[1]) for words in lines if words[0] == "bind"}


def haproxy_service() -> tuple[str, dict[str, Any]]:
    for name, service in services().items():
        if host_path(service, "/usr/local/etc/haproxy/haproxy.cfg") == HAPROXY_CFG:
            return name, service
    raise AssertionError("no compose service mounts haproxy.cfg")


def devices_frontend() -> tuple[str, list[list[str]]]:
    for kind, name, lines in haproxy_sections():
        if kind == "frontend" and haproxy_value(lines, "default_backend"):
            return name, lines
    raise AssertionError("haproxy.cfg has no frontend with a default_backend")


def test_haproxy_balances_the_devices_gateways_in_tcp_mode() -> None:
    defaults = haproxy_section("defaults")
    name, frontend = devices_frontend()
    backend_name = haproxy_value(frontend, "default_backend")[0]  # type: ignore[index]
    backend = haproxy_section("backend", backend_name)
    for lines in (frontend, backend):
        mode = haproxy_value(lines, "mode") or haproxy_value(defaults, "mode")
        assert mode == ["tcp"], f"haproxy {name}/{backend_name} must be layer 4 (mode tcp)"
    servers = {}
    for words in backend:
        if words[0] == "server":
            host, _, port = words[2].rpartition(":")
            servers[host] = int(port)
    gateways = fieldsync_services("gateway", all_profiles=False)
    devices = {n: s for n, s in gateways.items() if not admin_enabled(s)}
    assert set(servers) == set(devices), (
        f"backend {backend_name} balances {sorted(servers)}, the devices' gateways are "
        f"{sorted(devices)}"
    )
    for host, port in servers.items():
        assert port == gateway_port(devices[host]), (
            f"{host} listens on {gateway_port(devices[host])}"
        )


def test_haproxy_health_checks_and_timeouts_fit_the_gateways() -> None:
    _, frontend = devices_frontend()
    backend = haproxy_section("backend", haproxy_value(frontend, "default_backend")[0])  # type: ignore[index]
    send = haproxy_value(backend, "http-check", "send")
    assert send and "uri" in send, "gateways are checked over HTTP"
    uri = send[send.index("uri") + 1]
    assert uri in {"/readyz", "/healthz"}
    assert f'"{uri}"' in (ROOT / "gateway" / "app.py").read_text(), f"the gateway serves {uri}"
    defaults = haproxy_section("defaults")
    for side in ("client", "server"):
        timeout = haproxy_value(backend, "timeout", side) or haproxy_value(
            defaults, "timeout", side
        )
        assert timeout, f"timeout {side} is not set"
        for name, service in fieldsync_services("gateway", all_profiles=False).items():
            wait = float(
                environment(service).get(
                    "FIELDSYNC_GATEWAY_MAX_WAIT_S", setting_default("gateway_max_wait_s")
                )
            )
            assert seconds(timeout[0]) > wait, (
                f"timeout {side} {timeout[0]} cuts {name}'s long-polls ({wait:g} s)"
            )


def test_haproxy_listens_where_compose_publishes() -> None:
    _, service = haproxy_service()
    _, frontend = devices_frontend()
    published = {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}
    assert bind_ports(frontend) <= published, "the devices' frontend is not published"


# -- Prometheus ---------------------------------------------------------------------------------


def prometheus_targets() -> dict[str, list[str]]:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets: dict[str, list[str]] = {}
    for job in config["scrape_configs"]:
        found = [t for static in job.get("static_configs", []) for t in static["targets"]]
        targets[job["job_name"]] = found
    return targets


def served_ports() -> dict[str, set[int]]:
    """Ports reachable on the compose network, by host name, from the configuration."""
    ports: dict[str, set[int]] = defaultdict(set)
    for name, service in services().items():
        args = fieldsync_args(service) or []
        if args[:1] == ["gateway"]:
            ports[name].add(gateway_port(service))
        env = environment(service) if args else {}
        if env.get("FIELDSYNC_PROJECTOR_METRICS_HOST") == "0.0.0.0":
            ports[name].add(int(env["FIELDSYNC_PROJECTOR_METRICS_PORT"]))
        if host_path(service, "/etc/prometheus/prometheus.yml") == PROMETHEUS_YML:
            ports[name].add(9090)  # Prometheus' default --web.listen-address
            ports["localhost"].add(9090)
    haproxy, _ = haproxy_service()
    for kind, _, lines in haproxy_sections():
        if kind in {"frontend", "listen"}:
            ports[haproxy] |= bind_ports(lines)
    return ports


def test_prometheus_targets_are_served() -> None:
    ports = served_ports()
    every = services()
    for job, targets in prometheus_targets().items():
        assert targets, f"job {job} has no target"
        for target in targets:
            host, _, port = target.rpartition(":")
            assert host == "localhost" or host in every, f"job {job}: no service {host}"
            assert int(port) in ports[host], (
                f"job {job}: {host} serves nothing on {port} (it serves {sorted(ports[host])})"
            )


def test_projectors_serve_metrics_where_prometheus_scrapes_them() -> None:
    targets = {t for found in prometheus_targets().values() for t in found}
    for name, service in fieldsync_services("projector", all_profiles=False).items():
        env = environment(service)
        port = env.get("FIELDSYNC_PROJECTOR_METRICS_PORT")
        assert port, f"{name}: FIELDSYNC_PROJECTOR_METRICS_PORT is not set"
        # the default 127.0.0.1 is out of reach of Prometheus' container
        assert env.get("FIELDSYNC_PROJECTOR_METRICS_HOST") == "0.0.0.0", name
        assert f"{name}:{port}" in targets, f"{name} serves metrics on {port}, scraped elsewhere"


def test_every_gateway_and_projector_is_scraped() -> None:
    targets = {t for found in prometheus_targets().values() for t in found}
    hosts = {t.rpartition(":")[0] for t in targets}
    for name, service in fieldsync_services("gateway", all_profiles=False).items():
        assert truthy(environment(service).get("FIELDSYNC_GATEWAY_METRICS_ENABLED")), (
            f"{name} does not serve /metrics"
        )
        assert f"{name}:{gateway_port(service)}" in targets, f"{name} is not scraped"
    for name in fieldsync_services("projector", all_profiles=False):
        assert name in hosts, f"projector {name} is not scraped"


def test_healthchecks_probe_ports_the_service_serves() -> None:
    for name, service in services().items():
        if fieldsync_args(service) is None or "healthcheck" not in service:
            continue
        env = environment(service)
        own = {gateway_port(service)} if fieldsync_args(service) == ["gateway"] else set()
        if "FIELDSYNC_PROJECTOR_METRICS_PORT" in env:
            own.add(int(env["FIELDSYNC_PROJECTOR_METRICS_PORT"]))
        probed = re.findall(
            r"//127\.0\.0\.1:(\d+)/", " ".join(as_args(service["healthcheck"]["test"]))
        )
        assert probed, f"{name}: the healthcheck probes no local port"
        assert {int(p) for p in probed} <= own, f"{name}: probes {probed}, serves {sorted(own)}"


# -- metrics in the docs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", [OPERATIONS_MD, PROMETHEUS_YML, HAPROXY_CFG], ids=lambda p: str(p.relative_to(ROOT))
)
def test_metric_names_are_registered(path: Path) -> None:
    registered = registered_metric_names()
    assert "fieldsync_projector_events_total" in registered
    named = {n for n in METRIC_NAME.findall(path.read_text()) if n.upper() not in known_settings()}
    unknown = sorted(named - registered)
    assert not unknown, f"{path.relative_to(ROOT)} names metrics the code does not have: {unknown}"


def test_operations_guide_names_the_metrics() -> None:
    named = set(METRIC_NAME.findall(OPERATIONS_MD.read_text()))
    for needed in (
        "fieldsync_projector_lag",
        "fieldsync_projector_dead_lettered_total",
        "fieldsync_gateway_requests_total",
    ):
        assert needed in named, f"docs/operations.md should cover {needed}"


def test_compose_readme_describes_every_service() -> None:
    """Every service has a row in the README's service table (first column)."""
    described = set()
    for line in COMPOSE_README.read_text().splitlines():
        if line.startswith("|"):
            described.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    missing = [name for name in services() if name not in described]
    assert not missing, f"compose/README.md does not describe {missing}"
    unknown = sorted(described - set(services()))
    assert not unknown, f"compose/README.md describes services compose.yml lacks: {unknown}"


# -- Debezium profile ---------------------------------------------------------------------------


def test_debezium_topics_are_the_ones_the_org_file_maps() -> None:
    from engine.orgfile import load_org_registration
    from engine.projections.app import CHANGE_TOPIC
    from engine.projections.decoding import TopicRouter
    from engine.provisioning.commands import command_from_file

    connector = json.loads(CONNECTOR_JSON.read_text())
    prefix = connector["topic.prefix"]
    tables = [t.strip() for t in connector["table.include.list"].split(",")]
    produced = {f"{prefix}.{table}" for table in tables}
    for topic in produced:
        assert not CHANGE_TOPIC.match(topic), (
            f"{topic} is in FieldSync's own namespace: the projector would route it by name"
        )

    with_org_file = [
        (n, s)
        for n, s in fieldsync_services("projector").items()
        if "--org-file" in (fieldsync_args(s) or [])
    ]
    assert with_org_file, "no projector registers the Debezium org"
    name, service = with_org_file[0]
    args = fieldsync_args(service) or []
    org_file = host_path(service, args[args.index("--org-file") + 1])
    assert org_file is not None and org_file.is_file(), f"{name}: the org file is not mounted"
    registration = load_org_registration(org_file)
    assert set(registration.debezium_topics) == produced, (
        f"{org_file.name} maps {sorted(registration.debezium_topics)}, Debezium writes "
        f"{sorted(produced)}"
    )
    router = TopicRouter(
        {t: (registration.org, e) for t, e in registration.debezium_topics.items()}
    )
    for topic, entity in registration.debezium_topics.items():
        assert router.route(topic) == (registration.org, entity)

    # the same tables are the same entities as in the org FieldSync captures
    demo = command_from_file("provision", COMPOSE / "orgs" / "demo.yaml")
    assert demo.spec is not None
    entity_of_table = {table: entity for entity, table in demo.spec.entities.items()}
    for topic, entity in registration.debezium_topics.items():
        table = topic.removeprefix(prefix + ".")
        assert entity_of_table.get(table) == entity, f"{topic} → {entity}, demo has {table}"

    assert set(registration.debezium_topics.values()) == set(demo.spec.entities)
    assert service.get("profiles") == ["debezium"]


def test_debezium_connect_configuration() -> None:
    from engine.projections.app import CHANGE_TOPIC

    every = services()
    connector = json.loads(CONNECTOR_JSON.read_text())
    connect = next(
        (n, s)
        for n, s in every.items()
        if s.get("image", "").startswith("quay.io/debezium/connect") and "entrypoint" not in s
    )
    name, service = connect
    env = environment(service)
    assert service.get("profiles") == ["debezium"]
    for key in ("CONFIG_STORAGE_TOPIC", "OFFSET_STORAGE_TOPIC", "STATUS_STORAGE_TOPIC"):
        assert not CHANGE_TOPIC.match(env[key]), f"{key}={env[key]} looks like a change topic"
    assert connector["database.hostname"] in every
    assert "wal_level=logical" in as_args(every[connector["database.hostname"]].get("command"))
    # the password is a config-provider reference to a secret of the Connect container
    reference = re.fullmatch(r"\$\{(\w+):([^:}]+):([^}]+)\}", connector["database.password"])
    assert reference, "database.password must be a config-provider reference, not a password"
    provider, directory, key = reference.groups()
    assert provider in env["CONNECT_CONFIG_PROVIDERS"].split(",")
    assert env[f"CONNECT_CONFIG_PROVIDERS_{provider.upper()}_CLASS"].endswith(
        "DirectoryConfigProvider"
    )
    assert directory == "/run/secrets" and key in secret_names(service)
    # the registration puts this very file, under the connector's own name
    registration = next(s for s in every.values() if as_args(s.get("entrypoint")) == ["curl"])
    args = as_args(registration["command"])
    url = next(a for a in args if a.startswith("http://"))
    assert url.startswith(f"http://{name}:8083/connectors/")
    assert url == f"http://{name}:8083/connectors/{connector['name']}/config"
    data = args[args.index("--data-binary") + 1].removeprefix("@")
    assert host_path(registration, data) == CONNECTOR_JSON
