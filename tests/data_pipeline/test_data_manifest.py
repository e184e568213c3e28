"""manifest.json's typed reader/writer: round trip, the errors it names, and the loader still reads it."""

from __future__ import annotations

import json

import pytest

from data_pipeline.manifest import MANIFEST_FORMAT, Manifest, ManifestError, load_manifest, read_manifest
from tests.helpers import tiny_corpus_manifest


def test_tiny_manifest_round_trips_and_the_loader_reads_it(tmp_path):
    uri = tiny_corpus_manifest(tmp_path)
    raw = json.loads(open(uri).read())
    m = load_manifest(uri)
    assert m.to_dict() == raw and raw["format"] == MANIFEST_FORMAT
    assert m.splits["train"].num_shards == 3 and m.splits["val"].shards[0].file == "val/shard-00000.parquet"
    loaded = read_manifest(uri)
    assert loaded["splits"]["train"]["sequences"] == m.splits["train"].sequences
    assert Manifest.from_dict(loaded) == m  # the loader's added "uri" key is accepted


def test_bad_manifests_name_the_key(tmp_path):
    raw = json.loads(open(tiny_corpus_manifest(tmp_path)).read())
    with pytest.raises(ManifestError, match="not a raylm token manifest"):
        Manifest.from_dict({**raw, "format": "other/1"}, "m.json")
    broken = json.loads(json.dumps(raw))
    broken["splits"]["val"]["shards"][0]["sequences"] = "12"
    with pytest.raises(ManifestError, match=r"m.json: key 'splits.val.shards\[0\].sequences' must be int"):
        Manifest.from_dict(broken, "m.json")
    del broken["tokenizer"]["hash"]
    with pytest.raises(ManifestError, match=r"key 'tokenizer' lacks \['hash'\]"):
        Manifest.from_dict(broken, "m.json")
    with pytest.raises(ManifestError, match=r"key '<top>' has unknown keys \['extra'\]"):
        Manifest.from_dict({**raw, "extra": 1}, "m.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match="bad.json: not JSON"):
        load_manifest(str(tmp_path / "bad.json"))
