"""docker/compose.yaml: loopback ports unless opted in, no default secrets, auth in front.

No Docker engine runs here, so the file is parsed (PyYAML) and its ``${...}`` interpolation
is resolved the way ``docker compose`` does it. MLflow's basic auth is started for real from
the stack's auth settings, to show who can move ``champion``.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from projects import BIN, REPO, Server, free_port

DOCKER = REPO / "docker"
VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
SECRET = re.compile(r"PASSWORD|SECRET|AUTH_STRING|_KEY")
REQUIRED = {
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_SECRET_KEY",
    "PREFECT_AUTH_STRING",
    "MLFLOW_SERVE_PASSWORD",
}


class UnsetError(LookupError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` (``$$`` is ``$``)."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op and op.endswith("?") and not value:
            raise UnsetError(f"{name}: {arg}")
        if op and op.endswith("-") and not value:
            return arg
        return value or ""

    return VAR.sub(one, text.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def env_of(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def secrets_set() -> dict[str, str]:
    return {name: f"set-{name.lower()}" for name in REQUIRED}


def test_ports_are_published_on_loopback_unless_the_operator_opts_in(compose):
    published = {
        name: [str(p) for p in svc["ports"]]
        for name, svc in compose["services"].items()
        if svc.get("ports")
    }
    assert set(published) == {"minio", "mlflow", "prefect-server", "proxy"}
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("${WSIMIL_BIND:-127.0.0.1}:"), (name, port)
            assert interpolate(port, secrets_set()).startswith("127.0.0.1:"), (name, port)
            opted = interpolate(port, {**secrets_set(), "WSIMIL_BIND": "0.0.0.0"})
            assert opted.startswith("0.0.0.0:")
    assert "ports" not in compose["services"]["serve"]  # only through the proxy


def test_every_secret_must_be_set_and_none_has_a_default():
    text = (DOCKER / "compose.yaml").read_text()
    assert "wsimil-demo" not in text
    refs = [(m.group(1), m.group(2)) for m in VAR.finditer(text)]
    secret_refs = [(name, op) for name, op in refs if SECRET.search(name)]
    assert {name for name, _ in secret_refs} == REQUIRED
    assert all(op == ":?" for _, op in secret_refs), secret_refs
    for missing in REQUIRED:  # each one alone stops `docker compose` with its message
        env = {k: v for k, v in secrets_set().items() if k != missing}
        with pytest.raises(UnsetError, match=f"^{missing}: set {missing}"):
            interpolate(text, env)
    interpolate(text, secrets_set())


def test_no_service_carries_a_literal_secret(compose):
    for name, svc in compose["services"].items():
        for key, value in env_of(svc).items():
            if SECRET.search(key) and key not in {"MLFLOW_AUTH_CONFIG_PATH"}:
                assert VAR.fullmatch(value), (name, key, value)
        for key in ("PREFECT_API_DATABASE_CONNECTION_URL", "WSIMIL_TUNE_STORAGE"):
            if key in env_of(svc):
                assert "${POSTGRES_PASSWORD:?" in env_of(svc)[key]


def test_mlflow_runs_basic_auth_and_its_clients_log_in(compose):
    services = compose["services"]
    mlflow_svc = services["mlflow"]
    assert "--app-name basic-auth" in " ".join(mlflow_svc["command"])
    env = env_of(mlflow_svc)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_SECRET_KEY:?")
    mounted = {v.split(":")[1]: v.split(":")[0] for v in mlflow_svc["volumes"]}
    assert mounted[env["MLFLOW_AUTH_CONFIG_PATH"]] == "./mlflow-auth.ini"
    assert "mlflow-auth" in compose["volumes"]
    for client in ("prefect-worker", "serve"):
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(
            env_of(services[client])
        )
    worker, server = env_of(services["prefect-worker"]), env_of(services["prefect-server"])
    assert worker["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"]

    # the installed MLflow has the option; the stack's auth settings (the server test reads them)
    help_text = subprocess.run(
        [str(BIN / "mlflow"), "server", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    assert re.search(r"--app-name \[[^\]]*basic-auth", help_text)
    parser = configparser.ConfigParser()  # as mlflow.server.auth.config reads it
    parser.read(DOCKER / "mlflow-auth.ini")
    config = parser["mlflow"]
    assert config["default_permission"] == "READ"
    store = "/" + config["database_uri"].removeprefix("sqlite:////")
    assert Path(store).parent.as_posix() == "/var/lib/mlflow-auth"  # the volume
    assert "/var/lib/mlflow-auth" in (DOCKER / "tracking.Dockerfile").read_text()


def test_the_proxy_limits_the_body_as_the_served_model_does(compose):
    from wsimil.config import ServeConfig

    proxy = compose["services"]["proxy"]
    template = (DOCKER / "nginx.conf.template").read_text()
    assert "client_max_body_size ${WSIMIL_MAX_REQUEST_MB}m;" in template
    assert "proxy_pass http://serve:5001;" in template
    default = interpolate(env_of(proxy)["WSIMIL_MAX_REQUEST_MB"], {})
    assert float(default) == ServeConfig().max_request_mb
    mount = next(v for v in proxy["volumes"] if "nginx.conf.template" in v)
    assert mount.split(":")[1].startswith("/etc/nginx/templates/")


@pytest.mark.slow
def test_only_the_admin_or_a_granted_user_can_move_champion(tmp_path):
    """`mlflow server --app-name basic-auth` with the stack's settings, on 127.0.0.1."""
    import requests

    has_csrf = subprocess.run([str(BIN / "python"), "-c", "import flask_wtf"], timeout=60)
    if has_csrf.returncode != 0:  # MLflow's `auth` extra: in the tracking image, not the lock
        pytest.skip("Flask-WTF is not installed (docker/tracking.Dockerfile installs it)")
    ini = (DOCKER / "mlflow-auth.ini").read_text()
    ini = ini.replace("sqlite:////var/lib/mlflow-auth/", f"sqlite:///{tmp_path}/")
    (tmp_path / "auth.ini").write_text(ini)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw-for-this-test-1",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret",
    }
    cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", (tmp_path / "artifacts").as_uri()]  # fmt: skip
    server = Server(cmd, env, tmp_path / "server.log", cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    admin = ("admin", "admin-pw-for-this-test-1")
    try:
        server.wait_until(
            lambda: requests.get(f"{url}/health", timeout=2).status_code == 200, 180, "mlflow"
        )
        api = f"{url}/api/2.0/mlflow"

        def call(method, path, auth, **body):
            data = {"params": body} if method == "GET" else {"json": body}
            return requests.request(method, f"{api}/{path}", auth=auth, timeout=30, **data)

        assert call("POST", "registered-models/create", admin, name="wsimil-dtfd").ok
        source = "s3://mlflow/artifacts/model"  # only recorded, never read here
        created = call("POST", "model-versions/create", admin, name="wsimil-dtfd", source=source)
        assert created.ok, created.text[:500]
        version = created.json()["model_version"]["version"]
        assert call("POST", "users/create", admin, username="reader", password="reader-pw-123").ok
        reader = ("reader", "reader-pw-123")
        move = {"name": "wsimil-dtfd", "alias": "champion", "version": version}
        assert call("POST", "registered-models/alias", None, **move).status_code == 401
        assert call("GET", "registered-models/get", reader, name="wsimil-dtfd").ok  # READ
        assert call("POST", "registered-models/alias", reader, **move).status_code == 403
        assert call("POST", "registered-models/alias", admin, **move).ok
        grant = {"username": "reader", "resource_type": "registered_model",
                 "resource_id": "wsimil-dtfd", "permission": "EDIT"}  # fmt: skip
        granted = requests.post(f"{url}/api/3.0/mlflow/users/permissions/grant", json=grant,
                                auth=admin, timeout=30)  # fmt: skip
        assert granted.ok, granted.text[:500]
        assert call("POST", "registered-models/alias", reader, **move).ok
    finally:
        server.stop()
