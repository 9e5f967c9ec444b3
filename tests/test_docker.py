"""docker/: the compose file and image checked without a Docker engine, their commands run on this machine."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from regsearch._storage import open_storage
from tests.conftest import REPO, free_port
from tests.test_workers import PG_ADMIN, postgres_url  # noqa: F401, F811  (fixture)

COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
VARIABLE = re.compile(r"\$\{(?P<name>[A-Z_]+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution."""
    def sub(m: re.Match) -> str:
        value = env.get(m["name"])
        if value:
            return value
        if m["op"] == ":?":
            raise KeyError(f"{m['name']}: {m['arg']}")
        return m["arg"] or ""
    return VARIABLE.sub(sub, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), {"POSTGRES_PASSWORD": "pw-from-env"}))


def test_compose_needs_the_password_from_the_environment():
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD: set POSTGRES_PASSWORD in docker/.env"):
        interpolate(COMPOSE.read_text(), {})
    text = COMPOSE.read_text()
    # every password comes from the environment: a PASSWORD key's value is always a ${...} reference
    assert re.findall(r"^\s*\w*PASSWORD:[ \t]*(\S+)", text, flags=re.M) == ["${POSTGRES_PASSWORD:?set"]
    assert (REPO / "docker" / ".env.example").is_file()
    assert "docker/.env" in (REPO / ".gitignore").read_text().split()


def test_every_published_port_is_bound_to_localhost_by_default(compose):
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)
    opened = yaml.safe_load(interpolate(COMPOSE.read_text(), {"POSTGRES_PASSWORD": "x", "BIND_ADDRESS": "0.0.0.0"}))
    assert all(p.startswith("0.0.0.0:") for s in opened["services"].values() for p in s.get("ports", []))


def test_services_wire_postgres_mlflow_and_replicated_workers(compose):
    services = compose["services"]
    assert {"postgres", "mlflow", "worker"} <= set(services)
    server = services["mlflow"]["command"]
    assert server[0] == "server" and "--workers=1" in server
    assert any(a.startswith("--backend-store-uri=postgresql") for a in server)
    assert any(a.startswith("--artifacts-destination=") for a in server)
    assert any(a.startswith("--allowed-hosts=") for a in server)
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 2  # ${WORKERS:-2}
    assert worker["command"][0] == "optimize"
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and services["worker-gpu"]["profiles"] == ["gpu"]


def test_the_image_runs_regsearch_and_installs_the_postgres_driver():
    text = DOCKERFILE.read_text()
    assert 'ENTRYPOINT ["regsearch"]' in text and 'CMD ["optimize", "--study", "cifar"]' in text
    assert 'pip install ".[postgres]"' in text and "USER regsearch" in text
    for path in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (REPO / path).exists(), f"Dockerfile copies {path}, which the repository lacks"


def _rewrite(args: list[str], replace: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        key = arg.split("=", 1)[0]
        out.append(f"{key}={replace[key]}" if key in replace else arg)
    return out


@pytest.mark.slow
def test_compose_commands_run_a_cifar_study_against_local_postgres(compose, postgres_url, cifar_sample, tmp_path):
    """The mlflow service's command on a PostgreSQL backend, then the worker's command twice, outside Docker."""
    import psycopg

    mlflow_db = f"regsearch_mlflow_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{mlflow_db}"')
    port = free_port()
    server_args = _rewrite(compose["services"]["mlflow"]["command"], {
        "--host": "127.0.0.1", "--port": str(port), "--artifacts-destination": str(tmp_path / "artifacts"),
        "--backend-store-uri": f"postgresql+psycopg://postgres@127.0.0.1:5432/{mlflow_db}",
        "--allowed-hosts": f"127.0.0.1:{port},localhost:{port}"})
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    env = {**os.environ, **compose["services"]["mlflow"]["environment"]}
    server = subprocess.Popen([mlflow, *server_args], cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the compose mlflow command exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the compose mlflow server did not come up"
                time.sleep(0.5)
        worker = _rewrite(compose["services"]["worker"]["command"], {
            "--storage": postgres_url, "--tracking-uri": f"http://127.0.0.1:{port}", "--n-trials": "2"})
        regsearch = Path(sys.executable).parent / "regsearch"
        tiny = ["--data-dir", str(cifar_sample), "--set", "data.train_size=600", "--set", "training.epochs=1",
                "--device", "cpu"]
        replicas = [subprocess.Popen([str(regsearch), *worker, *tiny], cwd=tmp_path, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [r.communicate(timeout=300) for r in replicas]
        assert [r.returncode for r in replicas] == [0, 0], [o[1][-1500:] for o in outs]
        study = optuna.load_study(study_name="cifar", storage=open_storage(postgres_url))
        assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))) == 2
        from mlflow import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        runs = client.search_runs([client.get_experiment_by_name("cifar").experiment_id])
        assert sum("trial_number" in r.data.tags for r in runs) == 2
        assert sum(r.data.tags.get("regsearch.role") == "study" for r in runs) == 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        admin.execute(f'DROP DATABASE IF EXISTS "{mlflow_db}" WITH (FORCE)')
        admin.close()
