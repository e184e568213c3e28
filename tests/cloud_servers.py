"""A GCS emulator (gcp-storage-emulator, dev extra) and Azurite (npm, `scripts/install.sh dev`) on
127.0.0.1, reached as a user reaches the real services: through the environment variables Google's and
Azure's own SDKs read, which ``data_pipeline.storage`` maps onto pyarrow's filesystems.

Importing this module (test collection, before any test starts Ray) reserves a free port for each
emulator and exports STORAGE_EMULATOR_HOST and AZURE_STORAGE_CONNECTION_STRING (an account key drawn at
random), so every Ray worker inherits them, as each node of a cluster has its cloud's settings. The
session fixtures ``gcs_server`` and ``azure_server`` start the emulators on those ports (subprocesses
logging to files; a failure to start shows the log) and stop them at teardown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import pyarrow.fs as pafs
import pytest

REPO = Path(__file__).resolve().parents[1]
AZURITE_VERSION = "3.37.0"
AZURITE_DIR = REPO / ".cache" / "azurite"  # where scripts/install.sh dev installs it
GCS_BUCKET = "raylm-gcs"  # created by the emulator at start
AZURE_ACCOUNT = "raylmtest"
AZURE_KEY = base64.b64encode(secrets.token_bytes(64)).decode()  # Azurite takes it from AZURITE_ACCOUNTS


def _reserve_port() -> socket.socket:
    """A socket bound to a free 127.0.0.1 port, held until its emulator starts, so nothing else takes
    the port in between (the environment names it from collection on)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


_RESERVED = {"gcs": _reserve_port(), "azure": _reserve_port()}
GCS_PORT = _RESERVED["gcs"].getsockname()[1]
AZURE_PORT = _RESERVED["azure"].getsockname()[1]
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{GCS_PORT}"
os.environ["AZURE_STORAGE_CONNECTION_STRING"] = (
    f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={AZURE_KEY};"
    f"BlobEndpoint=http://127.0.0.1:{AZURE_PORT}/{AZURE_ACCOUNT};"
)


class Emulator:
    """One emulator subprocess on its reserved port, its stdout and stderr in ``log``."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Optional[dict] = None) -> None:
        self.name, self.log = name, log
        self.port = _RESERVED[name].getsockname()[1]
        _RESERVED[name].close()  # the emulator binds the port itself, now
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent, env={**os.environ, **(env or {})}
            )
        self._wait_until_listening(timeout_s=60)

    def _wait_until_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"{self.name} emulator did not start on 127.0.0.1:{self.port}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.log} (last {chars} chars) ---\n{text[-chars:]}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a second: Azurite waits for its clients' idle keep-alive
        connections to close before it exits, and the emulators keep nothing worth a clean exit."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def azurite_blob_command() -> str:
    """The azurite-blob executable: scripts/install.sh's copy, else one on PATH; fails saying how to
    install it (the Azure tests must run, not skip)."""
    local = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    found = str(local) if local.exists() else shutil.which("azurite-blob")
    if not found:
        pytest.fail(
            f"Azurite (npm package azurite@{AZURITE_VERSION}) is not installed: `bash scripts/install.sh dev` "
            f"installs it into {AZURITE_DIR.relative_to(REPO)} with npm (install Node.js with npm first, e.g. "
            f"`apt-get install nodejs npm`), or run `npm install --prefix .cache/azurite azurite@{AZURITE_VERSION}`"
        )
    return found


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """gcp-storage-emulator, in memory, with bucket ``GCS_BUCKET``."""
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        pytest.fail(
            "gcp-storage-emulator is not installed: it is in the dev extra; run `bash scripts/install.sh dev` "
            "(or `.venv/bin/pip install -e '.[dev]'`)"
        )
    argv = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={GCS_PORT}"]
    argv += ["--in-memory", f"--default-bucket={GCS_BUCKET}"]
    server = Emulator("gcs", argv, tmp_path_factory.mktemp("gcs_emulator") / "gcs_emulator.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory):
    """Azurite's blob service, in memory, serving account ``AZURE_ACCOUNT`` with key ``AZURE_KEY``."""
    command = azurite_blob_command()
    workdir = tmp_path_factory.mktemp("azurite")
    argv = [command, "--blobHost", "127.0.0.1", "--blobPort", str(AZURE_PORT), "--inMemoryPersistence"]
    argv += ["--skipApiVersionCheck"]
    server = Emulator("azure", argv, workdir / "azurite.log", env={"AZURITE_ACCOUNTS": f"{AZURE_ACCOUNT}:{AZURE_KEY}"})
    yield server
    server.stop()


def client_filesystem(cloud: str) -> pafs.FileSystem:
    """pyarrow's own filesystem on an emulator, configured explicitly (not through raylm's reading of the
    environment): what the tests upload with and check the stores with."""
    if cloud == "gs":
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{GCS_PORT}", scheme="http")
    authority = f"127.0.0.1:{AZURE_PORT}"
    return pafs.AzureFileSystem(
        AZURE_ACCOUNT,
        account_key=AZURE_KEY,
        blob_storage_authority=authority,
        blob_storage_scheme="http",
        dfs_storage_authority=authority,
        dfs_storage_scheme="http",
    )


def azure_account_sas(key: str = AZURE_KEY, expiry: str = "2099-01-01T00:00:00Z") -> str:
    """An account SAS for ``AZURE_ACCOUNT``'s blobs, signed with ``key``, without the leading '?', as a
    connection string's SharedAccessSignature holds one (Azure's account-SAS signing, version 2019-12-12)."""
    version, permissions = "2019-12-12", "rwdlac"
    to_sign = "\n".join([AZURE_ACCOUNT, permissions, "b", "sco", "", expiry, "", "", version, ""])
    signature = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()).decode()
    return f"sv={version}&ss=b&srt=sco&sp={permissions}&se={quote(expiry, safe='')}&sig={quote(signature, safe='')}"
