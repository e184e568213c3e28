"""Resharding reads by share: a rank fetches only its slice of a parameter file from object storage
(a real moto S3 server), and the sparse copy loads as the file would for that slice. The whole path
(convert once, fetch by share, restore) runs in the resized runs: test_multinode's elastic run on S3
(one conversion per resize, each rank's download within 1.5x its share) and test_train_ray's 2 -> 1
and 2 -> 3 -> 2; ``bench_checkpoint.py --reshard`` checks the masters bit for bit."""

from __future__ import annotations

import pyarrow.fs as pafs
import torch

from orchestration.train.reshard import disk_bytes, read_file_slice


def _s3(s3_server) -> pafs.S3FileSystem:
    import boto3

    boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1").create_bucket(Bucket="reshard")
    return pafs.S3FileSystem(endpoint_override=s3_server["endpoint_url"], scheme="http", region="us-east-1")


def test_a_slice_is_read_alone_and_loads_where_it_belongs(s3_server, tmp_path):
    fs = _s3(s3_server)
    full = torch.randn(1_000_003)  # 4 MB, not a multiple of the ranks
    for name, saved in (("dict.pt", {"param": full, "cat_dim": 0}), ("tensor.pt", full)):
        torch.save(saved, tmp_path / name)
        pafs.copy_files(str(tmp_path / name), f"reshard/{name}", destination_filesystem=fs)
        size = (tmp_path / name).stat().st_size
        per_rank = -(-full.numel() // 3)
        for rank in range(3):
            first = rank * per_rank
            count = min(per_rank, full.numel() - first)
            target = tmp_path / f"rank{rank}-{name}" / name
            target.parent.mkdir(exist_ok=True)
            read = read_file_slice(fs, f"reshard/{name}", target, (first, count))
            assert count * 4 <= read <= count * 4 + 8192  # the slice, the zip structure and the pickle
            assert target.stat().st_size == size and disk_bytes(target.parent) < size * 0.5  # holes elsewhere
            loaded = torch.load(target, mmap=True, weights_only=False)
            loaded = loaded["param"] if isinstance(loaded, dict) else loaded
            assert torch.equal(loaded[first : first + count], full[first : first + count])
        whole = tmp_path / "whole" / name
        whole.parent.mkdir(exist_ok=True)
        assert read_file_slice(fs, f"reshard/{name}", whole, None) == size
        assert whole.read_bytes() == (tmp_path / name).read_bytes()
