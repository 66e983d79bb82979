"""A team's servers as the README's Operations section starts them: PostgreSQL, and `mlflow server` and `prefect server`
on databases of it, each in temporary directories on loopback ports; for the tests and for bench/team_load.py (and the
registration writer the tests spawn, which must not import the pipeline)."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port, running

UNPRIVILEGED_USER = "postgres"  # Debian's package creates it; PostgreSQL refuses to run as root
PORT_ATTEMPTS = 5  # a free port can be taken by another process before PostgreSQL binds it: try another


class PostgreSQLMissing(RuntimeError):
    """PostgreSQL's server programs are not installed; the message says how to install them."""


def postgresql_bindir() -> Path:
    """Where initdb, pg_ctl and postgres are: the newest /usr/lib/postgresql/<version>/bin (Debian puts them there,
    off the PATH), else the directory of an initdb on the PATH."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[-3]))
    found = versions[-1] if versions else shutil.which("initdb")
    if found is None:
        raise PostgreSQLMissing(
            "PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb, no initdb on the PATH): "
            "run 'make postgresql' as root, or 'sudo apt-get install postgresql'"
        )
    return Path(found).parent


@dataclass(frozen=True)
class PostgreSQL:
    """A running PostgreSQL cluster on 127.0.0.1: a superuser with a password, and password authentication over TCP."""

    port: int
    user: str
    password: str

    def url(self, database: str, driver: str = "postgresql") -> str:
        """``driver://user:password@127.0.0.1:port/database``; MLflow's store takes "postgresql", Prefect's
        "postgresql+asyncpg"."""
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create the database ``name`` (an SQL identifier of letters, digits and _), empty or a copy of the database
        ``template``, and return its name."""
        import psycopg2

        for identifier in filter(None, (name, template)):
            if not identifier.replace("_", "").isalnum():
                raise ValueError(f"database name {identifier!r}: use letters, digits and _ only")
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname="postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        finally:
            connection.close()
        return name


# Databases with every migration of MLflow's and of Prefect's schema applied: a server started on a copy of one
# (create_database(name, template=...)) skips the seconds its migrations take on a new database.
MLFLOW_TEMPLATE, PREFECT_TEMPLATE = "mlflow_template", "prefect_template"


def create_migrated_templates(cluster: PostgreSQL, directory: Path) -> None:
    """Create MLFLOW_TEMPLATE and PREFECT_TEMPLATE in ``cluster``, migrated by the projects' own commands (`mlflow db
    upgrade`, `prefect server database upgrade`), whose processes have exited, as a template's copying requires."""
    migrations = {
        MLFLOW_TEMPLATE: ([executable("mlflow"), "db", "upgrade", cluster.url(MLFLOW_TEMPLATE)], {}),
        PREFECT_TEMPLATE: ([executable("prefect"), "server", "database", "upgrade", "--yes"], {
            "PREFECT_HOME": str(directory / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": cluster.url(PREFECT_TEMPLATE, "postgresql+asyncpg"),
        }),
    }
    running_migrations = {}
    for database, (command, env) in migrations.items():
        cluster.create_database(database)
        running_migrations[database] = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for database, process in running_migrations.items():
        output, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"migrating {database} failed ({process.returncode}):\n{output[-3000:]}")


@contextmanager
def postgresql_cluster(max_connections: int = 200) -> Iterator[PostgreSQL]:
    """A new PostgreSQL cluster (initdb) in a temporary directory, started on a free loopback port, stopped and deleted
    at the end. As root, its programs run as the unprivileged user ``postgres``, who owns the directory."""
    bindir = postgresql_bindir()
    as_root = os.geteuid() == 0
    owner = pwd.getpwnam(UNPRIVILEGED_USER) if as_root else None
    home = Path(tempfile.mkdtemp(prefix="postgresql-"))
    if owner is not None:
        os.chown(home, owner.pw_uid, owner.pw_gid)
    data, log, password_file = home / "data", home / "postgresql.log", home / "password"
    password = secrets.token_hex(16)
    password_file.write_text(password + "\n")
    if owner is not None:
        os.chown(password_file, owner.pw_uid, owner.pw_gid)

    def run(*command: str) -> subprocess.CompletedProcess:
        user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if owner is not None else {}
        return subprocess.run(command, cwd=home, capture_output=True, text=True, timeout=300, **user)

    initdb = run(
        str(bindir / "initdb"), "--pgdata", str(data), "--username", "team", "--pwfile", str(password_file),
        "--auth-host", "scram-sha-256", "--auth-local", "trust", "--encoding", "UTF8", "--no-instructions",
    )
    if initdb.returncode != 0:
        shutil.rmtree(home, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stdout}{initdb.stderr}")
    try:
        for _ in range(PORT_ATTEMPTS):
            port = free_port()
            options = f"-h 127.0.0.1 -p {port} -k {home} -c max_connections={max_connections}"
            started = run(str(bindir / "pg_ctl"), "start", "--pgdata", str(data), "--log", str(log), "--wait", "--timeout", "120", "-o", options)
            if started.returncode == 0:
                break
            if "Address already in use" not in log.read_text():
                raise RuntimeError(f"PostgreSQL did not start ({started.returncode}):\n{started.stdout}{started.stderr}\n{log.read_text()[-3000:]}")
        else:
            raise RuntimeError(f"PostgreSQL found no free port in {PORT_ATTEMPTS} attempts:\n{log.read_text()[-3000:]}")
        try:
            yield PostgreSQL(port=port, user="team", password=password)
        finally:
            run(str(bindir / "pg_ctl"), "stop", "--pgdata", str(data), "--mode", "fast", "--wait")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def executable(name: str) -> str:
    """A console script of this virtual environment (mlflow, prefect)."""
    return str(Path(sys.executable).parent / name)


# The pipeline uses none of MLflow's server-side jobs (GenAI scoring, trace archival); without this the server also
# starts a job runner and six Huey consumer processes of about 240 MB each.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_command(backend_store_uri: str, artifacts: Path, port: int, workers: int = 1) -> list[str]:
    """`mlflow server` over ``backend_store_uri``, storing and serving artifacts in ``artifacts``, on 127.0.0.1.

    One worker process by default: with more, uvicorn's supervisor kills a worker that has not answered its health
    check within 5 s, which on a loaded 2-core machine happens again and again during start-up (seen here: 3 minutes).
    """
    return [
        executable("mlflow"), "server", "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
    ]


@contextmanager
def mlflow_server(backend_store_uri: str, directory: Path, port: int | None = None) -> Iterator[str]:
    """`mlflow server` on ``backend_store_uri`` with its artifacts in ``directory/artifacts`` and its log in
    ``directory/mlflow-server.log``, until the block ends; yields its URL (the MLFLOW_TRACKING_URI of its clients)."""
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    command = mlflow_server_command(backend_store_uri, directory / "artifacts", port)
    with running(command, ready_url=f"{url}/health", log=directory / "mlflow-server.log", env=MLFLOW_SERVER_ENV):
        yield url


@contextmanager
def prefect_server(database_url: str, directory: Path) -> Iterator[str]:
    """`prefect server start` on the PostgreSQL database ``database_url`` (``postgresql+asyncpg://...``), its home in
    ``directory``, until the block ends; yields its API URL (the PREFECT_API_URL of its clients)."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_HOME": str(directory / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
    }
    command = [executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running(command, ready_url=f"{api_url}/health", log=directory / "prefect-server.log", env=env):
        yield api_url


def register_when_all_are_ready(uri: str, model_uri: str, writer: int, barrier) -> None:
    """In a separate (spawned) process: register a version of "concurrent" the moment all writers are ready. Here, not
    in the test module, so that each process imports MLflow alone, not the pipeline and torch (seconds each)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    barrier.wait(timeout=300)
    mlflow.register_model(model_uri, "concurrent", tags={"writer": str(writer)})
