import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Pinned threads: tests share a 2-core machine and must not fight each other.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from autoprune.data import load_dataset

    return load_dataset("digits")


def run_cli(*args, cwd=None, check=False, timeout=600):
    """Run the real `autoprune` command in a subprocess (1 thread), return CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "autoprune.cli", "--threads", "1", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"autoprune {' '.join(map(str, args))} failed "
                             f"({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def mid_budget(ckpt, tables, at: float = 0.5) -> str:
    """A ``--latency-budget`` halfway (or ``at`` of the way) from the smallest policy to the
    unpruned model, on the cpu-ort table in ``tables``. The digits model's latency is mostly
    fixed cost, so its smallest policy predicts at 0.6 to 0.8 of the unpruned one, depending on
    the machine's load while calibrating: a fixed fraction such as 0.7 is sometimes
    infeasible."""
    out = json.loads(run_cli("predict", "--target-device", "cpu-ort", "--weights", ckpt,
                             "--tables", tables, "--json", check=True).stdout)
    low = out['smallest_ms'] / out['full_ms']
    return f"{low + at * (1 - low):.3f}"


def assert_user_error(proc, *needles):
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("autoprune: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory):
    """A ResNet-20 trained for 3 epochs on digits through the real CLI."""
    out = tmp_path_factory.mktemp("ckpt") / "r20-digits.pt"
    run_cli("train", "--model", "resnet20", "--data", "digits", "--epochs", "3", "--out", out,
            "--quiet", check=True)
    return out


@pytest.fixture(scope="module")
def cli_env(digits_ckpt, tmp_path_factory):
    """The digits model, its cpu-ort table profiled through the CLI (one per test module), and
    a budget halfway from its smallest policy to the unpruned model."""
    tables = tmp_path_factory.mktemp("tables")
    run_cli("profile", "--target-device", "cpu-ort", "--weights", digits_ckpt, "--tables",
            tables, "--calibrate", "3", "--quiet", check=True)
    return digits_ckpt, tables, mid_budget(digits_ckpt, tables)


@pytest.fixture()
def rpc_server(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "rpc.log"
    # The server listens in a child of its own (`tvm.exec.popen_worker`), which a SIGTERM to
    # the server alone leaves running, orphaned, at about 400 MB: two were found after every
    # full run of the suite. So it gets a session of its own, and the whole group is stopped.
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                             "--port", str(port), "--port-end", str(port + 1)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "bind to" not in log.read_text():  # its import is slow on a busy machine
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield port
    finally:
        _stop_group(proc)


def _postgres_bindir() -> Path | None:
    """Where PostgreSQL's server programs are: on PATH, or Debian's versioned folder (the
    `postgresql` package leaves initdb and pg_ctl off PATH)."""
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the tests, started in a folder of its own on a free port of
    127.0.0.1 and stopped at the end: a function ``database(name) -> URL`` that creates an empty
    database on it. `make install` installs the server (Debian's `postgresql`) and the driver
    (psycopg, the `postgres` extra). PostgreSQL refuses to run as root, so under root the
    server runs as the `postgres` user the package creates."""
    import pwd
    import shutil
    import socket
    import tempfile

    pytest.importorskip("psycopg", reason="the PostgreSQL driver: `pip install -e '.[dev]'`")
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's server is not installed: `make install` installs it")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="autoprune-pg-"))
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root with no `postgres` user to run PostgreSQL's server")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, log = root / "data", root / "server.log"

    def run(*cmd):
        subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True, text=True,
                       timeout=120)

    try:
        run(bindir / "initdb", "-D", data, "-U", "autoprune", "--auth=trust", "-E", "UTF8",
            "--no-sync")
        run(bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError(f"PostgreSQL did not start: {e.stderr}\n"
                             f"{log.read_text() if log.is_file() else ''}") from e

    def database(name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="autoprune", dbname="postgres",
                             autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://autoprune@127.0.0.1:{port}/{name}"

    try:
        yield database
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc``'s process group (``start_new_session``), SIGKILL to whatever of it
    is left after 10 s."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone of the group still there?
            except ProcessLookupError:
                proc.wait(timeout=10)
                return
            proc.poll()  # reap the leader, so that it does not count as still there
            time.sleep(0.2)
    proc.wait(timeout=10)
