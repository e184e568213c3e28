"""gs:// and az:// for real: a GCS emulator and Azurite on 127.0.0.1 (tests/cloud_servers.py), reached
through the environment variables Google's and Azure's SDKs read, never through settings in a config.
One flow crosses both stores, so that each is read and written by Ray Data tasks, Ray Train workers and
the driver in one pair of trainer launches: raw text uploaded to gs:// is prepared into shards on az://,
a tiny run reads them and checkpoints on gs://, is resumed from there to more steps, and eval reads the
checkpoint from gs:// and the data from az://."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import pickle
import re
import socket
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from cloud_servers import (  # noqa: F401 (fixtures)
    AZURE_KEY,
    AZURE_PORT,
    GCS_BUCKET,
    azure_account_sas,
    azure_server,
    client_filesystem,
    gcs_server,
)
from helpers import tiny_config

from data_pipeline import cloud_auth
from data_pipeline.cloud_auth import AZURE_CONNECTION_STRING_ENV, AzureEnvFileSystem, gcs_credentials_source
from data_pipeline.storage import (
    DataSourceError,
    embedded_corpus_dir,
    filesystem_for,
    list_dir,
    list_files,
    read_bytes,
)
from orchestration.artifacts import RunDir, read_metrics
from orchestration.checkpoint_format import CHECKPOINT_META_FILE, MODEL_FILE

CONTAINER = "raylm"
ROOTS = {"gs": f"gs://{GCS_BUCKET}", "az": f"az://{CONTAINER}"}
# Where the flow puts each thing: the raw text and the run on GCS, the shards on Azure
RAW, DATA, RUNS = "gs", "az", "gs"
SERVERS = {"gs": "gcs_server", "az": "azure_server"}  # the fixtures of cloud_servers.py
PLAYS = 4
PREPARE = [  # a few kB per play: clean, train a 400-token BPE, pack 33-token rows, a quarter of the plays for val
    "data.clean.strip_gutenberg=false",
    "data.near_dedup.enabled=false",
    "data.tokenizer.vocab_size=400",
    "data.output.seq_len=32",
    "data.output.val_fraction=0.25",
]
# Steps 1-2, a checkpoint at 2; then resumed from it to step 4. One checkpoint kept: the store deletes one.
TRAIN = [
    "train.grad_accum_steps=1",
    "train.warmup_steps=1",
    "train.checkpoint_interval=2",
    "train.eval_interval=2",
    "train.log_interval=2",
    "train.val_sequences=4",
    "train.num_to_keep=1",
]


def upload_plays(cloud: str) -> None:
    """A 12 kB excerpt of each of ``PLAYS`` plays as <root>/raw/<play>.txt, written by pyarrow configured
    directly."""
    fs = client_filesystem(cloud)
    base = ROOTS[cloud].split("://")[1]
    for play in sorted(embedded_corpus_dir().glob("*_gut.txt"))[:PLAYS]:
        text = play.read_text(encoding="utf-8", errors="replace")
        with fs.open_output_stream(f"{base}/raw/{play.name}") as f:
            f.write(text[len(text) // 3 : len(text) // 3 + 12_000].encode())


def run_flow(eval_out) -> dict:
    """`raylm prepare` of raw text uploaded to ``RAW`` into shards on ``DATA``, a 2-step run on ``RUNS``, the
    same run resumed to step 4, `raylm eval` of the run. Returns what each step left and its console output
    (printed: shown on failure)."""
    from orchestration.cli import main
    from orchestration.train.driver import run_training

    manifest = f"{ROOTS[DATA]}/data/manifest.json"
    run_uri = f"{ROOTS[RUNS]}/runs/run"
    flow, seconds, out = {"manifest": manifest, "run": run_uri}, {}, io.StringIO()

    @contextlib.contextmanager
    def phase(name: str):
        start = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - start, 1)

    def train(max_steps: int, resume: bool) -> dict:
        overrides = [*TRAIN, f"train.max_steps={max_steps}"]
        return run_training(
            tiny_config(manifest, f"{ROOTS[RUNS]}/runs", "run", zero_stage=1, overrides=overrides), resume=resume
        )

    try:
        with contextlib.redirect_stdout(out):
            with phase("prepare"):
                upload_plays(RAW)
                client_filesystem("az").create_dir(CONTAINER)  # as `az storage container create` would
                flow["prepare_rc"] = main(
                    [
                        "prepare",
                        *PREPARE,
                        f"data.sources.uris=[{ROOTS[RAW]}/raw/]",
                        f"data.output.uri={ROOTS[DATA]}/data",
                    ]
                )
            with phase("train"):
                flow["first"] = train(2, resume=False)
            flow["after_first"] = _listing(RUNS, "runs/run")
            with phase("resume"):
                flow["resumed"] = train(4, resume=True)
            with phase("eval"):
                flow["eval_rc"] = main(
                    ["eval", "--checkpoint", run_uri, "--data", manifest, "--max-sequences", "4"]
                    + ["--out", str(eval_out)]
                )
    finally:
        print(out.getvalue())
        print(f"seconds per phase: {seconds}")
    flow["eval"] = json.loads(eval_out.read_text()) if flow["eval_rc"] == 0 else None
    return {**flow, "output": out.getvalue()}


@pytest.mark.slow
def test_prepare_train_resume_and_eval_across_gcs_and_azure(request, ray_session, sort_based_shuffle, tmp_path):
    """The whole flow, each store in the roles ``RAW``, ``DATA`` and ``RUNS`` give it (two trainer launches in
    all, where a flow per store took four); the emulators' logs are printed with a failure."""
    servers = [request.getfixturevalue(name) for name in SERVERS.values()]
    try:
        flow = run_flow(tmp_path / "eval.json")
        check_prepare(flow)
        check_training_and_resume(flow)
        check_eval(flow)
        check_the_key_is_never_pickled_nor_stored(flow)
    except BaseException:
        for server in servers:
            print(server.log_tail())
        raise


def _listing(cloud: str, under: str) -> set[str]:
    """Names directly under ``<root>/<under>``, from a recursive listing by a directly configured client
    (one level of a GCS listing shows only directories that have marker objects)."""
    base = f"{ROOTS[cloud].split('://')[1]}/{under}"
    infos = client_filesystem(cloud).get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1 :].split("/")[0] for i in infos}


def _read(cloud: str, under: str) -> bytes:
    with client_filesystem(cloud).open_input_stream(f"{ROOTS[cloud].split('://')[1]}/{under}") as f:
        return f.read()


def check_prepare(flow: dict) -> None:
    """`raylm prepare` read the raw text on ``RAW`` and wrote every shard on ``DATA``."""
    assert flow["prepare_rc"] == 0
    manifest = json.loads(_read(DATA, "data/manifest.json"))
    assert manifest["sources"][0]["uri"] == f"{ROOTS[RAW]}/raw/" and manifest["sources"][0]["files"] == PLAYS
    assert manifest["cleaning"]["documents_in"] == PLAYS
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert shards, split
        for shard in shards:  # every shard the manifest lists is on the store, at its recorded size
            assert len(_read(DATA, f"data/{shard['file']}")) == shard["bytes"], shard


def check_training_and_resume(flow: dict) -> None:
    """The run checkpointed on ``RUNS``; the second run found that checkpoint there and went on from it."""
    run_uri = flow["run"]
    assert flow["first"]["checkpoint"] == f"{run_uri}/checkpoint_00000002"
    assert "checkpoint_00000002" in flow["after_first"] and "checkpoint_manager_snapshot.json" in flow["after_first"]
    assert f"resuming {run_uri} from step 2 ({run_uri}/checkpoint_00000002)" in flow["output"]
    resumed = flow["resumed"]
    assert resumed["final_step"] == 4 and resumed["checkpoint"] == f"{run_uri}/checkpoint_00000004"
    records = read_metrics(RunDir.at(run_uri))
    assert [(r["step"], r["start_step"]) for r in records] == [(2, 0), (4, 2)]
    # what is on the store, listed by a client configured directly: the new checkpoint, complete, and
    # the older one deleted (train.num_to_keep=1)
    checkpoints = sorted(name for name in _listing(RUNS, "runs/run") if name.startswith("checkpoint_0"))
    assert checkpoints == ["checkpoint_00000004"]
    meta = json.loads(_read(RUNS, f"runs/run/checkpoint_00000004/{CHECKPOINT_META_FILE}"))
    assert meta["step"] == 4 and meta["files"][MODEL_FILE] == len(
        _read(RUNS, f"runs/run/checkpoint_00000004/{MODEL_FILE}")
    )


def check_eval(flow: dict) -> None:
    """`raylm eval` of the run directory read its newest checkpoint from ``RUNS`` and the val shards from
    ``DATA``."""
    assert flow["eval_rc"] == 0
    result = flow["eval"]
    assert result["checkpoint"] == f"{flow['run']}/checkpoint_00000004" and result["step"] == 4
    assert result["data"]["uri"] == flow["manifest"] and result["data"]["split"] == "val"
    # the run's own val loss at step 4 was on the same first 4 val sequences, with the same weights
    val_loss = read_metrics(RunDir.at(flow["run"]))[-1]["val_loss"]
    assert result["suites"]["lm"]["loss"] == pytest.approx(val_loss, abs=1e-4)


def check_the_key_is_never_pickled_nor_stored(flow: dict) -> None:
    """Azure's key (the GCS emulator is anonymous: no key there). Ray tasks and Ray Train workers get the
    filesystem pickled: it carries the account and endpoints, and each process reads the key from its own
    environment. No object the flow wrote, on either store (the run on GCS records the Azure data's URI in
    its config), holds the key."""
    shards = RunDir.at(f"{ROOTS[DATA]}/data")  # a directory on Azure, as a run directory there is
    assert AZURE_KEY.encode() not in pickle.dumps(shards)
    assert pickle.loads(pickle.dumps(shards)).names() == shards.names()  # the unpickled copy reads the store
    for cloud, base, at_least in (("az", CONTAINER, 5), ("gs", GCS_BUCKET, 10)):
        infos = client_filesystem(cloud).get_file_info(pafs.FileSelector(base, recursive=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File]
        assert len(files) > at_least, (cloud, files)
        for path in files:
            with client_filesystem(cloud).open_input_stream(path) as f:
                assert AZURE_KEY.encode() not in f.read(), path


@pytest.mark.usefixtures("azure_server")
def test_wrong_or_missing_credentials_name_the_uri_and_what_to_set(monkeypatch, tmp_path):
    """A refused Azure key, a key missing where the filesystem is unpickled (a Ray node started without
    it), no Google credentials at all and a broken Google key file: each error names the URI and the
    variables, before any training starts."""
    good_fs, path = filesystem_for(f"az://{CONTAINER}/raw")
    good_fs.create_dir(CONTAINER)
    pickled = pickle.dumps(good_fs)
    wrong_key = AZURE_KEY[:-8] + "AAAAAAA="
    monkeypatch.setenv(AZURE_CONNECTION_STRING_ENV, azure_connection_string_with(wrong_key))
    fs, path = filesystem_for(f"az://{CONTAINER}/raw")
    with pytest.raises(
        DataSourceError, match=f"(?s)az://{CONTAINER}/raw: cannot list .*403.*AZURE_STORAGE_CONNECTION_STRING"
    ):
        list_files(f"az://{CONTAINER}/raw", fs, path, (".txt",))
    monkeypatch.delenv(AZURE_CONNECTION_STRING_ENV)
    with pytest.raises(DataSourceError, match="no Azure account key in this process's environment.*every node"):
        pickle.loads(pickled)

    without_google_credentials(monkeypatch, tmp_path)
    monkeypatch.setattr(cloud_auth, "GCE_METADATA_DEFAULT_HOST", f"127.0.0.1:{closed_port()}")
    source = gcs_credentials_source()
    if source != "metadata server":  # a Google Cloud machine (its DMI name) has one: nothing missing there
        assert source is None
        with pytest.raises(
            DataSourceError,
            match="gs://b-1/x: no Google Cloud credentials found.*GOOGLE_APPLICATION_CREDENTIALS.*"
            "STORAGE_EMULATOR_HOST",
        ):
            filesystem_for("gs://b-1/x")
    key_file = tmp_path / "key.json"
    key_file.write_text('{"type": "service_account"}')  # no client_email: refused before any request
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    fs, path = filesystem_for("gs://b-1/x")
    with pytest.raises(DataSourceError, match="gs://b-1/x: cannot list .*client_email.*GOOGLE_APPLICATION_CREDENTIALS"):
        list_files("gs://b-1/x", fs, path, (".txt",))


def without_google_credentials(monkeypatch, home) -> None:
    """No Google credentials from the environment: no variable, no gcloud ADC file under ``home``."""
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_GCLOUD_ADC_PATH_OVERRIDE"):
        monkeypatch.delenv(name, raising=False)
    for name in cloud_auth.GCE_METADATA_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def metadata_server(flavor):
    """A stand-in for a metadata server on 127.0.0.1 (its host:port yielded): answering every GET with the
    header Metadata-Flavor ``flavor`` (None: without it), or, with ``flavor="silent"``, taking connections
    and never answering."""
    if flavor == "silent":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            yield f"127.0.0.1:{sock.getsockname()[1]}"
        return

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            if flavor:
                self.send_header("Metadata-Flavor", flavor)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("flavor", "refused"),
    [("Google", False), ("silent", False), (None, True)],
    ids=["metadata-server", "no-answer-in-time", "another-cloud's-server"],
)
def test_the_google_credentials_check_refuses_only_what_cannot_work(flavor, refused, monkeypatch, tmp_path):
    """On GKE (workload identity) or Cloud Run there is no key file, no variable and often no DMI name: the
    metadata server answering is enough. One that does not answer in time is not taken for "none"; only
    something else answering (another cloud's metadata service) or nothing listening means no credentials."""
    without_google_credentials(monkeypatch, tmp_path)
    monkeypatch.setattr(cloud_auth, "METADATA_PROBE_TIMEOUT_S", 0.5)
    if Path("/sys/class/dmi/id/product_name").is_file() and gcs_credentials_source() == "metadata server":
        refused = False  # a Google Cloud machine: its DMI name says so before any request
    with metadata_server(flavor) as host:
        monkeypatch.setattr(cloud_auth, "GCE_METADATA_DEFAULT_HOST", host)
        if refused:
            with pytest.raises(DataSourceError, match="gs://b-1/x: no Google Cloud credentials found"):
                filesystem_for("gs://b-1/x")
        else:
            fs, path = filesystem_for("gs://b-1/x")
            assert isinstance(fs, pafs.GcsFileSystem) and path == "b-1/x"
    adc = tmp_path / "gcloud-config" / "application_default_credentials.json"
    adc.parent.mkdir()
    adc.write_text("{}")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(adc.parent))  # gcloud writes there; pyarrow reads only $HOME's
    monkeypatch.setattr(cloud_auth, "GCE_METADATA_DEFAULT_HOST", f"127.0.0.1:{closed_port()}")
    if gcs_credentials_source() is None:
        with pytest.raises(DataSourceError, match=f"ADC file {adc} is not where pyarrow looks"):
            filesystem_for("gs://b-1/x")
    home_adc = tmp_path / ".config" / "gcloud" / "application_default_credentials.json"
    home_adc.parent.mkdir(parents=True)
    home_adc.write_text("{}")
    assert gcs_credentials_source() == f"gcloud application-default credentials ({home_adc})"


def azure_connection_string_with(key: str) -> str:
    return os.environ[AZURE_CONNECTION_STRING_ENV].replace(AZURE_KEY, key)


@pytest.mark.usefixtures("azure_server")
def test_a_run_on_a_store_that_refuses_its_key_stops_before_training(tiny_corpus, monkeypatch):
    from orchestration.config import ConfigError
    from orchestration.train.driver import run_training

    client_filesystem("az").create_dir(CONTAINER)
    monkeypatch.setenv(AZURE_CONNECTION_STRING_ENV, azure_connection_string_with(AZURE_KEY[:-8] + "AAAAAAA="))
    cfg = tiny_config(tiny_corpus, f"az://{CONTAINER}/runs", "refused")
    with pytest.raises(
        ConfigError,
        match=f"(?s)train.storage_path: cannot reach az://{CONTAINER}/runs/refused .*403.*"
        f"{AZURE_CONNECTION_STRING_ENV}",
    ):
        run_training(cfg, resume=False)


KEY = base64.b64encode(b"k" * 64).decode()


@pytest.mark.parametrize(
    ("uri", "env", "options"),
    [
        (  # a sovereign cloud's connection string: endpoints from its suffix
            "az://c/p",
            {
                AZURE_CONNECTION_STRING_ENV: f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={KEY};"
                "EndpointSuffix=core.chinacloudapi.cn"
            },
            {
                "account_name": "acct",
                "account_key": KEY,
                "blob_storage_authority": ".blob.core.chinacloudapi.cn",
                "dfs_storage_authority": ".dfs.core.chinacloudapi.cn",
                "blob_storage_scheme": "https",
            },
        ),
        (  # the account and its cloud in an abfs:// URI, the key in the environment
            "abfs://c@acct.dfs.core.usgovcloudapi.net/p",
            {"AZURE_STORAGE_ACCOUNT_KEY": KEY},
            {
                "account_name": "acct",
                "account_key": KEY,
                "blob_storage_authority": ".blob.core.usgovcloudapi.net",
                "dfs_storage_authority": ".dfs.core.usgovcloudapi.net",
            },
        ),
        (  # account name + SAS token (pyarrow appends it to each URL as given: with its '?')
            "az://c/p",
            {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_SAS_TOKEN": "sv=2024&sig=abc"},
            {
                "account_name": "acct",
                "account_key": "",
                "sas_token": "?sv=2024&sig=abc",
                "blob_storage_authority": ".blob.core.windows.net",
            },
        ),
        (  # the portal's SAS connection string: no AccountName, the account in its BlobEndpoint
            "az://c/p",
            {
                AZURE_CONNECTION_STRING_ENV: "BlobEndpoint=https://acct.blob.core.windows.net/;"
                "QueueEndpoint=https://acct.queue.core.windows.net/;SharedAccessSignature=sv=2024&sig=a%2Bb%3D"
            },
            {
                "account_name": "acct",
                "sas_token": "?sv=2024&sig=a%2Bb%3D",
                "dfs_storage_authority": ".dfs.core.windows.net",
            },
        ),
        (  # pyarrow's other abfs:// form: the account's host, then the container
            "abfs://acct.dfs.core.windows.net/c/p",
            {"AZURE_STORAGE_ACCOUNT_KEY": KEY},
            {"account_name": "acct", "account_key": KEY, "blob_storage_authority": ".blob.core.windows.net"},
        ),
        (  # no secret: Azure's default credential chain (service principal, managed identity, CLI)
            "abfs://c@acct.dfs.core.windows.net/p",
            {},
            {
                "account_name": "acct",
                "account_key": "",
                "sas_token": "",
                "dfs_storage_authority": ".dfs.core.windows.net",
            },
        ),
    ],
)
def test_azure_settings_map_onto_pyarrow_options(uri, env, options, monkeypatch):
    for name in (AZURE_CONNECTION_STRING_ENV, "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AZURE_STORAGE_SAS_TOKEN", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fs, path = filesystem_for(uri)
    assert path == "c/p"
    configured = pafs.AzureFileSystem.__reduce__(fs)[1][0]  # pyarrow's own record of what it was given
    assert {k: configured[k] for k in options} == options


@pytest.mark.parametrize(
    ("uri", "connection_string", "error"),
    [
        (
            "abfs://c@other.dfs.core.windows.net/p",
            f"AccountName=acct;AccountKey={KEY}",
            "names storage account 'other'",
        ),
        ("az://c/p", "UseDevelopmentStorage=true", "give the emulator's full connection string"),
        (
            "az://c/p",
            f"AccountName=acct;AccountKey={KEY};BlobEndpoint=https://blobs.example.com",
            "neither https://acct",
        ),
        ("az:///p", f"AccountName=acct;AccountKey={KEY}", "name the container"),
        ("abfs://acct.dfs.core.windows.net", f"AccountName=acct;AccountKey={KEY}", "name the container"),
    ],
)
def test_azure_settings_that_cannot_work_are_refused_before_any_request(uri, connection_string, error, monkeypatch):
    monkeypatch.setenv(AZURE_CONNECTION_STRING_ENV, connection_string)
    with pytest.raises(DataSourceError, match=re.escape(error)):
        filesystem_for(uri)


def test_a_key_for_another_account_is_refused(monkeypatch):
    monkeypatch.delenv(AZURE_CONNECTION_STRING_ENV, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "other")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", KEY)
    with pytest.raises(
        DataSourceError, match="names storage account 'acct' but AZURE_STORAGE_ACCOUNT_NAME is for 'other'"
    ):
        filesystem_for("abfs://c@acct.dfs.core.windows.net/p")


@pytest.mark.usefixtures("azure_server")
def test_a_sas_from_a_connection_string_works_and_never_shows(monkeypatch):
    """A SAS connection string (no AccountName, no '?' before the token) reaches the store; a refused SAS's
    error (pyarrow's quotes the request URL, token included) shows no signature, nor does any pickle."""
    client_filesystem("az").create_dir("sas-data")
    with client_filesystem("az").open_output_stream("sas-data/raw/a.txt") as f:
        f.write(b"hello")
    sas = azure_account_sas()
    endpoint = f"BlobEndpoint=http://127.0.0.1:{AZURE_PORT}/raylmtest"
    monkeypatch.setenv(AZURE_CONNECTION_STRING_ENV, f"{endpoint};SharedAccessSignature={sas}")
    fs, path = filesystem_for("az://sas-data/raw")
    assert [i.path for i in list_files("az://sas-data/raw", fs, path, (".txt",))] == ["sas-data/raw/a.txt"]
    signature = sas.rsplit("sig=", 1)[1]
    assert signature.encode() not in pickle.dumps(fs)
    assert pickle.loads(pickle.dumps(fs)).get_file_info(f"{path}/a.txt").is_file  # the copy reads the SAS itself

    wrong = azure_account_sas(base64.b64encode(b"w" * 64).decode())
    monkeypatch.setenv(AZURE_CONNECTION_STRING_ENV, f"{endpoint};SharedAccessSignature={wrong}")
    with pytest.raises(DataSourceError, match="(?s)cannot read .*sig=<redacted>.*403") as raised:
        read_bytes("az://sas-data/raw/a.txt")
    assert wrong.rsplit("sig=", 1)[1] not in str(raised.value) and raised.value.__cause__ is None


def test_no_azure_filesystem_pickles_its_key(monkeypatch):
    """Also a plain pyarrow AzureFileSystem (as pyarrow hands one back from C++) pickles without its key,
    and is rebuilt from the environment of the process unpickling it."""
    monkeypatch.setenv(AZURE_CONNECTION_STRING_ENV, f"AccountName=acct;AccountKey={KEY}")
    plain = pafs.AzureFileSystem("acct", account_key=KEY, blob_storage_authority=".blob.core.windows.net")
    data = pickle.dumps(plain)
    assert KEY.encode() not in data
    rebuilt = pickle.loads(data)
    assert isinstance(rebuilt, AzureEnvFileSystem)
    assert pafs.AzureFileSystem.__reduce__(rebuilt)[1][0]["account_key"] == KEY


def test_storage_errors_mask_credentials():
    err = DataSourceError(
        "az://c/p: cannot read (GetProperties failed for 'https://a.blob.core.windows.net/c/p?sv=2024&sig=S3CRET%3D'"
        "; AccountKey=abc==;SharedAccessSignature=sv=1&sig=x)"
    )
    assert "S3CRET" not in str(err) and "abc==" not in str(err) and "sig=x" not in str(err)
    assert "sv=2024&sig=<redacted>'" in str(err) and "AccountKey=<redacted>;" in str(err)


def test_list_dir_is_pyarrows_one_level_listing_on_local_disk(tmp_path):
    (tmp_path / "run" / "checkpoint_00000002" / "ds").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint_00000002" / "ds" / "a.pt").write_bytes(b"x")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}")
    fs, path = filesystem_for(str(tmp_path / "run"))
    expected = fs.get_file_info(pafs.FileSelector(path))
    assert sorted((i.path, i.type) for i in list_dir(fs, path)) == sorted((i.path, i.type) for i in expected)
    assert list_dir(fs, f"{path}/missing") == []


class CountingGcs(pafs.GcsFileSystem):
    """The emulator, listing one level as real GCS does (pyarrow's directory markers shown), and counting
    recursive listings."""

    recursive_listings = 0

    def get_file_info(self, what):
        if isinstance(what, pafs.FileSelector) and what.recursive:
            self.recursive_listings += 1
        if not isinstance(what, pafs.FileSelector) or what.recursive:
            return super().get_file_info(what)
        deep = super().get_file_info(pafs.FileSelector(what.base_dir, recursive=True, allow_not_found=True))
        return [i for i in deep if "/" not in i.path[len(what.base_dir) + 1 :]]  # a marker lists as a directory


@pytest.mark.usefixtures("gcs_server")
def test_list_dir_finds_gcs_directories_with_or_without_markers():
    """Objects copied in without directory markers (as `gcloud storage cp -r` does) still show their
    directories; a level whose directories have markers (pyarrow and Ray Train write them) is listed
    without reading everything below it."""
    client = client_filesystem("gs")
    for name in ("copied/checkpoint_00000002/ds/a.pt", "copied/checkpoint_00000004/model.safetensors", "copied/m.json"):
        with client.open_output_stream(f"{GCS_BUCKET}/{name}") as f:
            f.write(b"x")
    fs, path = filesystem_for(f"gs://{GCS_BUCKET}/copied")
    found = {i.base_name: i.type for i in list_dir(fs, path)}
    assert found == {
        "checkpoint_00000002": pafs.FileType.Directory,
        "checkpoint_00000004": pafs.FileType.Directory,
        "m.json": pafs.FileType.File,
    }
    fs.create_dir(f"{GCS_BUCKET}/marked/checkpoint_00000002/ds")
    with fs.open_output_stream(f"{GCS_BUCKET}/marked/checkpoint_00000002/ds/a.pt") as f:
        f.write(b"x")
    counting = CountingGcs(anonymous=True, endpoint_override=fs.__reduce__()[1][0]["endpoint_override"], scheme="http")
    assert [i.base_name for i in list_dir(counting, f"{GCS_BUCKET}/marked")] == ["checkpoint_00000002"]
    assert counting.recursive_listings == 0
