"""A real PostgreSQL server for the tests (Debian's `postgresql`, which `.ci/run` installs when missing): a fresh
cluster in a temporary folder of its own (pytest's are private to root, which the server's user cannot
enter), on a free port of 127.0.0.1, owned by the `postgres` user when the tests run as
root (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from models.runtime import free_port


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql; .ci/run does)")
    return found


def _as_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class Postgres:
    """`with Postgres() as url:` a server for as long as the block runs; `url` is SQLAlchemy's."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="visionserve-postgres-"))
        self.data, self.port = self.folder / "data", free_port()

    def __enter__(self) -> str:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        subprocess.run(_as_owner([_binary("initdb"), "-D", str(self.data), "-U", "hub", "--auth=trust",
                                  "--no-sync"]), check=True, capture_output=True)
        subprocess.run(_as_owner([_binary("pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l",
                                  str(self.data / "server.log"), "-o",
                                  f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off",
                                  "start"]), check=True, capture_output=True)
        return f"postgresql://hub@127.0.0.1:{self.port}/postgres"

    def __exit__(self, *exc: object) -> None:
        subprocess.run(_as_owner([_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)
