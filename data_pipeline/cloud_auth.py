"""gs:// and az:// / abfs:// URIs -> pyarrow filesystems whose credentials come only from the environment.

- gs://: Google's application default credentials, which pyarrow's client (google-cloud-cpp) resolves
  itself on each node: GOOGLE_APPLICATION_CREDENTIALS, gcloud's ADC file under $HOME, the metadata
  server on Google Cloud (GCE, GKE workload identity, Cloud Run). ``gcs_credentials_source`` checks
  up front that one of them is there, since pyarrow's client would otherwise wait on a metadata
  server for minutes. STORAGE_EMULATOR_HOST=http://host:port points at an emulator, anonymously.
- az:// / abfs://: AZURE_STORAGE_CONNECTION_STRING, else AZURE_STORAGE_ACCOUNT_NAME with
  AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN (the names adlfs / fsspec read), else Azure's
  default credential chain, which pyarrow runs itself. ``AzureEnvFileSystem`` keeps the key or SAS out
  of its pickle: each process re-reads it from its own environment.
"""

from __future__ import annotations

import copyreg
import functools
import http.client
import os
import platform
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

from data_pipeline.storage import DataSourceError

GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
GCS_CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
GCS_ADC_OVERRIDE_ENV = "GOOGLE_GCLOUD_ADC_PATH_OVERRIDE"  # google-cloud-cpp's own override of the ADC file
# The metadata server's host:port: google-cloud-cpp (pyarrow's client) reads GCE_METADATA_ROOT, google-auth
# GCE_METADATA_HOST; unset, both reach 169.254.169.254 (metadata.google.internal).
GCE_METADATA_ENVS = ("GCE_METADATA_ROOT", "GCE_METADATA_HOST")
GCE_METADATA_DEFAULT_HOST = "169.254.169.254"
METADATA_PROBE_TIMEOUT_S = 2.0
AZURE_CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
AZURE_ACCOUNT_ENV = "AZURE_STORAGE_ACCOUNT_NAME"
AZURE_KEY_ENV = "AZURE_STORAGE_ACCOUNT_KEY"
AZURE_SAS_ENV = "AZURE_STORAGE_SAS_TOKEN"


def storage_hint(uri: str, endpoint_key: str = "endpoint_url") -> str:
    """What to check when the store behind ``uri`` refuses or cannot be reached: the bucket or container
    and the settings (``endpoint_key`` for S3, environment variables for GCS and Azure) that point there."""
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("gs", "gcs"):
        return (
            f"check the bucket and the Google credentials ({GCS_CREDENTIALS_ENV}, `gcloud auth "
            f"application-default login`, or {GCS_EMULATOR_ENV}=http://host:port for an emulator)"
        )
    if scheme in ("abfs", "abfss", "az"):
        return (
            f"check the container and the Azure credentials ({AZURE_CONNECTION_STRING_ENV}, or "
            f"{AZURE_ACCOUNT_ENV} with {AZURE_KEY_ENV} or {AZURE_SAS_ENV}, or AZURE_CLIENT_ID/AZURE_TENANT_ID/"
            "AZURE_CLIENT_SECRET)"
        )
    return f"check the bucket name, credentials and {endpoint_key}"


# ---- Google Cloud Storage ----------------------------------------------------------------------------


def gcs_filesystem(uri: str) -> pafs.GcsFileSystem:
    """A GCS filesystem: anonymous on the emulator that STORAGE_EMULATOR_HOST names, else Google's
    default credentials, which pyarrow resolves itself on each node (its pickle holds only options)."""
    emulator = os.environ.get(GCS_EMULATOR_ENV)
    if emulator:
        parsed = urlparse(emulator if "://" in emulator else f"http://{emulator}")  # Google's clients take both
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise DataSourceError(f"{uri}: {GCS_EMULATOR_ENV}={emulator!r} must look like http://host:port")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=parsed.netloc, scheme=parsed.scheme)
    key_file = os.environ.get(GCS_CREDENTIALS_ENV)
    if key_file and not Path(key_file).is_file():
        raise DataSourceError(f"{uri}: {GCS_CREDENTIALS_ENV}={key_file} is not a file; point it at a credentials JSON")
    if gcs_credentials_source() is None:
        elsewhere = _gcloud_adc_file_elsewhere()
        moved = f"; gcloud's ADC file {elsewhere} is not where pyarrow looks: set {GCS_CREDENTIALS_ENV} to it"
        raise DataSourceError(
            f"{uri}: no Google Cloud credentials found; set {GCS_CREDENTIALS_ENV} to a service-account or "
            "workload-identity JSON file, run `gcloud auth application-default login`, run on Google Cloud "
            f"(GCE_METADATA_ROOT=host:port names a metadata server elsewhere), or set {GCS_EMULATOR_ENV}="
            f"http://host:port for an emulator{moved if elsewhere else ''}"
        )
    return pafs.GcsFileSystem()


def gcs_credentials_source() -> Optional[str]:
    """Where Google's default credentials come from on this machine, in the order pyarrow's client looks:
    GOOGLE_APPLICATION_CREDENTIALS, gcloud's ADC file, a metadata server (a Google Cloud machine's DMI name,
    else one quick request to it, as google-auth makes). None only when none is there: a metadata server
    that does not answer in time may be a slow one, so that is not taken for "none"."""
    if os.environ.get(GCS_CREDENTIALS_ENV):
        return GCS_CREDENTIALS_ENV
    adc = _gcloud_adc_file()
    if adc is not None and adc.is_file():
        return f"gcloud application-default credentials ({adc})"
    try:
        on_google_cloud = Path("/sys/class/dmi/id/product_name").read_text().startswith("Google")
    except OSError:  # no DMI: a container sandbox (GKE Sandbox, Cloud Run) or another OS
        on_google_cloud = False
    if on_google_cloud:
        return "metadata server"
    host = next((os.environ[name] for name in GCE_METADATA_ENVS if os.environ.get(name)), GCE_METADATA_DEFAULT_HOST)
    answered = metadata_server_answers(host.removeprefix("http://").rstrip("/"), METADATA_PROBE_TIMEOUT_S)
    if answered is None:
        return f"metadata server at {host} (not confirmed: no answer within {METADATA_PROBE_TIMEOUT_S:g} s)"
    return f"metadata server at {host}" if answered else None


def _gcloud_adc_file() -> Optional[Path]:
    """The ADC file pyarrow's client reads: GOOGLE_GCLOUD_ADC_PATH_OVERRIDE, else gcloud's default place
    under $HOME (%APPDATA% on Windows); None when there is no home to look in."""
    if os.environ.get(GCS_ADC_OVERRIDE_ENV):
        return Path(os.environ[GCS_ADC_OVERRIDE_ENV])
    home = os.environ.get("APPDATA") if os.name == "nt" else os.environ.get("HOME")
    if not home:
        return None
    return Path(home, *(() if os.name == "nt" else (".config",)), "gcloud", "application_default_credentials.json")


def _gcloud_adc_file_elsewhere() -> Optional[Path]:
    """gcloud's ADC file under CLOUDSDK_CONFIG, which gcloud writes to but pyarrow's client never reads."""
    config = os.environ.get("CLOUDSDK_CONFIG")
    adc = Path(config, "application_default_credentials.json") if config else None
    return adc if adc is not None and adc.is_file() else None


@functools.lru_cache(maxsize=None)
def metadata_server_answers(host: str, timeout_s: float) -> Optional[bool]:
    """Whether a Google metadata server answers at ``host`` (host[:port]): True when one does (its
    Metadata-Flavor: Google header), False when the request fails or something else answers, None when
    nothing answers within ``timeout_s``. One GET of ``/``, as google-auth's check makes; once per process."""
    conn = http.client.HTTPConnection(host, timeout=timeout_s)
    try:
        conn.request("GET", "/", headers={"Metadata-Flavor": "Google"})
        return conn.getresponse().getheader("Metadata-Flavor") == "Google"
    except TimeoutError:
        return None
    except (OSError, http.client.HTTPException):  # refused, unreachable, no such host, not HTTP
        return False
    finally:
        conn.close()


# ---- Azure Blob Storage / Data Lake Storage ------------------------------------------------------------


def azure_filesystem(uri: str) -> tuple[AzureEnvFileSystem, str]:
    """(filesystem, path ``container/...`` inside it) for az://CONTAINER/path,
    abfs[s]://CONTAINER@ACCOUNT.dfs.core.windows.net/path (fsspec's form) or
    abfs[s]://ACCOUNT.dfs.core.windows.net/CONTAINER/path (pyarrow's other form); the account, endpoints
    and kind of credential come from the URI and the environment."""
    parsed = urlparse(uri)
    container, _, host = parsed.netloc.partition("@")
    path = parsed.path
    if not host and "." in container:  # container names never hold a '.': this is the account's host
        host, (container, _, rest) = container, parsed.path.lstrip("/").partition("/")
        path = f"/{rest}" if rest else ""
    if not container:
        raise DataSourceError(
            f"{uri}: name the container (az://CONTAINER/path or abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/path)"
        )
    conn = _azure_connection_string(uri)
    uri_account, _, uri_suffix = host.partition(".")
    given = _connection_account(conn) if conn else os.environ.get(AZURE_ACCOUNT_ENV)
    account = uri_account or given
    if not account:
        raise DataSourceError(
            f"{uri}: name the storage account (abfs://container@ACCOUNT.dfs.core.windows.net/...), or set "
            f"{AZURE_ACCOUNT_ENV} or {AZURE_CONNECTION_STRING_ENV}"
        )
    env_secret = os.environ.get(AZURE_KEY_ENV) or os.environ.get(AZURE_SAS_ENV)
    if given and given != account and (conn or env_secret):  # the key, SAS or endpoints are another account's
        where = AZURE_CONNECTION_STRING_ENV if conn else AZURE_ACCOUNT_ENV
        raise DataSourceError(
            f"{uri}: names storage account {account!r} but {where} is for {given!r}; use that account or the "
            f"settings of {account!r}"
        )
    if conn:
        endpoints = _azure_connection_endpoints(uri, account, conn)
        credential = "key" if "accountkey" in conn else "sas" if "sharedaccesssignature" in conn else "default"
    else:
        suffix = uri_suffix.split(".", 1)[1] if uri_suffix.startswith(("dfs.", "blob.")) else "core.windows.net"
        endpoints = _azure_endpoints("https", f".blob.{suffix}")
        credential = "key" if os.environ.get(AZURE_KEY_ENV) else "sas" if os.environ.get(AZURE_SAS_ENV) else "default"
    return AzureEnvFileSystem(uri, account, credential, **endpoints), f"{container}{path}".rstrip("/")


def _azure_connection_string(uri: str) -> dict[str, str]:
    """AZURE_STORAGE_CONNECTION_STRING as {lowercased key: value} ({} when unset). Values keep their own
    '=' (an AccountKey's base64 padding, a SAS's parameters)."""
    raw = os.environ.get(AZURE_CONNECTION_STRING_ENV, "").strip()
    if not raw:
        return {}
    fields = {}
    for part in filter(None, (p.strip() for p in raw.split(";"))):
        key, sep, value = part.partition("=")
        if not sep:
            raise DataSourceError(f"{uri}: {AZURE_CONNECTION_STRING_ENV} has a part without '=' (Key=Value;...)")
        fields[key.strip().lower()] = value.strip()
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        raise DataSourceError(
            f"{uri}: {AZURE_CONNECTION_STRING_ENV}=UseDevelopmentStorage=true is not read here; give the "
            "emulator's full connection string (AccountName, AccountKey, BlobEndpoint), as Azurite's docs print it"
        )
    return fields


def _connection_account(conn: dict[str, str]) -> Optional[str]:
    """The account a connection string is for: AccountName, else its BlobEndpoint's (a SAS connection
    string from the portal has only endpoints and the SAS)."""
    if conn.get("accountname"):
        return conn["accountname"]
    blob = urlparse(conn.get("blobendpoint", ""))
    if ".blob." in blob.netloc:  # https://ACCOUNT.blob.SUFFIX
        return blob.netloc.split(".", 1)[0]
    return blob.path.strip("/") or None  # an emulator's http://host:port/ACCOUNT


def _azure_connection_endpoints(uri: str, account: str, conn: dict[str, str]) -> dict[str, str]:
    """pyarrow's endpoint options from a connection string: BlobEndpoint (an emulator's
    http://host:port/ACCOUNT or https://ACCOUNT.blob.SUFFIX), else DefaultEndpointsProtocol + EndpointSuffix."""
    blob = conn.get("blobendpoint")
    if not blob:
        return _azure_endpoints(
            conn.get("defaultendpointsprotocol", "https"), f".blob.{conn.get('endpointsuffix', 'core.windows.net')}"
        )
    parsed = urlparse(blob)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise DataSourceError(f"{uri}: {AZURE_CONNECTION_STRING_ENV}'s BlobEndpoint {blob!r} must be an http(s) URL")
    if parsed.netloc.startswith(f"{account}."):  # https://ACCOUNT.blob.core.windows.net
        return _azure_endpoints(parsed.scheme, parsed.netloc[len(account) :])
    if parsed.path.strip("/") == account:  # an emulator's path-style endpoint, http://127.0.0.1:10000/ACCOUNT
        return _azure_endpoints(parsed.scheme, parsed.netloc)
    raise DataSourceError(
        f"{uri}: {AZURE_CONNECTION_STRING_ENV}'s BlobEndpoint {blob!r} is neither https://{account}.blob.<suffix> "
        f"nor http(s)://host:port/{account}; pyarrow's Azure filesystem reaches only those two forms"
    )


def _azure_endpoints(scheme: str, blob_authority: str) -> dict[str, str]:
    """Blob and Data Lake (dfs) endpoints: ``.blob.SUFFIX`` pairs with ``.dfs.SUFFIX``; an emulator's
    host:port serves both (without them pyarrow's namespace check goes to *.dfs.core.windows.net)."""
    dfs_authority = f".dfs.{blob_authority[len('.blob.') :]}" if blob_authority.startswith(".blob.") else blob_authority
    return {
        "blob_storage_scheme": scheme,
        "blob_storage_authority": blob_authority,
        "dfs_storage_scheme": scheme,
        "dfs_storage_authority": dfs_authority,
    }


class AzureEnvFileSystem(pafs.AzureFileSystem):
    """pyarrow's Azure filesystem with its secret (account key or SAS token) read from the environment of
    the process using it, also when unpickled: pyarrow's own pickle carries the key into every Ray task and
    Ray Train's controller; this one carries the account, endpoints and kind of credential only.

    ``credential``: "key", "sas" or "default" (Azure's credential chain, which pyarrow runs itself)."""

    def __init__(self, uri: str, account_name: str, credential: str, **endpoints: str):
        self._args = (uri, account_name, credential, endpoints)
        super().__init__(account_name, **_azure_secret(uri, credential), **endpoints)

    def __reduce__(self):
        uri, account_name, credential, endpoints = self._args
        return functools.partial(AzureEnvFileSystem, uri, account_name, credential, **endpoints), ()


def _azure_secret(uri: str, credential: str) -> dict[str, str]:
    """{"account_key": ...} or {"sas_token": "?..."} from this process's environment; {} for "default"."""
    if credential == "default":
        return {}
    conn = _azure_connection_string(uri)
    if credential == "key":
        secret = conn.get("accountkey") or os.environ.get(AZURE_KEY_ENV)
        option, names = "account_key", f"{AZURE_CONNECTION_STRING_ENV} (AccountKey=) or {AZURE_KEY_ENV}"
    else:
        secret = conn.get("sharedaccesssignature") or os.environ.get(AZURE_SAS_ENV)
        option, names = "sas_token", f"{AZURE_CONNECTION_STRING_ENV} (SharedAccessSignature=) or {AZURE_SAS_ENV}"
    if not secret:  # the driver had it: a Ray node started without it
        raise DataSourceError(
            f"{uri}: no Azure {option.replace('_', ' ')} in this process's environment (host {platform.node()}); "
            f"set {names} on every node, before `ray start`"
        )
    if option == "sas_token" and not secret.startswith("?"):
        # pyarrow appends the token to each URL as given; a connection string's SAS and `az ... generate-sas`
        # come without the '?'
        secret = f"?{secret}"
    return {option: secret}


_ENDPOINT_OPTIONS = ("blob_storage_authority", "blob_storage_scheme", "dfs_storage_authority", "dfs_storage_scheme")


def _reduce_pyarrow_azure_filesystem(fs: pafs.AzureFileSystem):
    """A plain pyarrow Azure filesystem holding a key or SAS (one pyarrow hands back from C++, e.g. a
    dataset fragment's) pickles as an AzureEnvFileSystem too, so that no secret reaches a Ray task."""
    reconstruct, (options,) = pafs.AzureFileSystem.__reduce__(fs)
    credential = "key" if options.get("account_key") else "sas" if options.get("sas_token") else None
    if credential is None:  # nothing secret in it (or a service principal pyarrow was given: not raylm's)
        return reconstruct, (options,)
    account = options["account_name"]
    endpoints = {name: options[name] for name in _ENDPOINT_OPTIONS if options.get(name)}
    return functools.partial(AzureEnvFileSystem, f"Azure account {account}", account, credential, **endpoints), ()


copyreg.pickle(pafs.AzureFileSystem, _reduce_pyarrow_azure_filesystem)
