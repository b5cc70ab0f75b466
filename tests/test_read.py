"""Reading shards: WebDataset key grouping, and every broken shard or sample accounted for."""

import tarfile

import pyarrow as pa

from conftest import job_config, sample_members
from pipeline.embed.demo import write_tar_shard
from pipeline.embed.read import MARKER_POSITION, iter_tar_samples, positioned_members, read_shards, split_member_name


def read_all(tiny_models, tmp_path, path) -> tuple[list[dict], dict]:
    cfg = job_config(tiny_models, str(path), str(tmp_path / "out"))
    blocks = list(read_shards(pa.table({"shard": [str(path)]}), cfg))
    rows = pa.concat_tables(blocks).to_pylist()
    samples = [r for r in rows if r["position"] != MARKER_POSITION]
    (marker,) = [r for r in rows if r["position"] == MARKER_POSITION]
    return samples, marker


def test_member_names_follow_webdataset_rules():
    assert split_member_name("abc.jpg") == ("abc", "jpg")
    assert split_member_name("dir/abc.seg.PNG") == ("dir/abc", "seg.png")
    assert split_member_name("noext") == (None, None)
    assert split_member_name(".hidden") == (None, None)


def test_grouping_missing_members_and_duplicates(tiny_models, tmp_path):
    members = (sample_members("a", "一", 1) + sample_members("b", None, 2)           # b: no caption
               + [("c.txt", "只有标题".encode())]                                   # c: no image
               + sample_members("d", "四", 3) + [("d.pkl", b"\x80\x04evil"), ("../../etc/e.jpg", b"x")]
               + sample_members("a", "again", 4))                                    # a again: duplicate
    path = tmp_path / "s.tar"
    write_tar_shard(path, members)
    samples, marker = read_all(tiny_models, tmp_path, path)
    assert [s["key"] for s in samples] == ["a", "b", "c", "d", "../../etc/e", "a"]
    assert [s["position"] for s in samples] == list(range(6))
    assert marker["shard_samples"] == 6 and marker["shard_error"] is None
    assert samples[1]["caption"] is None and samples[1]["image"] is not None
    assert samples[2]["image"] is None
    assert "ignored members: pkl" in samples[3]["warning"]
    assert samples[5]["error"].startswith("duplicate_key")
    assert samples[0]["error"] is None


def test_report_and_filter_count_samples_as_the_embed_job_does(tmp_path):
    """The report and the filtered shards find samples by position: their count must be the embed job's,
    including a repeated ignored member (one sample) and a repeated kept one (two samples)."""
    members = (sample_members("a", "一", 1) + [("a.npy", b"1"), ("a.npy", b"2")]
               + sample_members("b", "二", 2) + sample_members("b", "again", 3) + sample_members("c", "三", 4))
    path = tmp_path / "s.tar"
    write_tar_shard(path, members)
    with open(path, "rb") as f:
        embedded = [(s.position, s.key) for s in iter_tar_samples(f)]
    assert embedded == [(0, "a"), (1, "b"), (2, "b"), (3, "c")]
    with tarfile.open(path, mode="r|") as tar:
        positioned = sorted({(position, key) for position, key, _, _ in positioned_members(tar)})
    assert positioned == embedded


def test_truncated_tar_keeps_the_samples_before_the_cut(tiny_models, tmp_path):
    path = tmp_path / "s.tar"
    members = [m for k in range(5) for m in sample_members(f"k{k}", "标题", k)]
    write_tar_shard(path, members)
    payload = path.read_bytes()
    # cut inside the 4th sample's image
    offsets = [m.offset_data for m in tarfile.open(path)]
    path.write_bytes(payload[: offsets[9] + 100])
    samples, marker = read_all(tiny_models, tmp_path, path)
    assert [s["key"] for s in samples] == ["k0", "k1", "k2", "k3"]
    assert all(s["error"] is None for s in samples[:3])
    assert samples[3]["error"].startswith("shard_truncated")
    assert marker["shard_samples"] == 4 and marker["shard_error"].startswith("shard_truncated")


def test_broken_shards_are_reported_not_raised(tiny_models, tmp_path):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"this is plainly not a tar file" * 40)
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    samples, marker = read_all(tiny_models, tmp_path, empty)
    assert samples == [] and marker["shard_samples"] == 0 and marker["shard_error"] is None
    for path in (not_tar, zero):
        samples, marker = read_all(tiny_models, tmp_path, path)
        assert samples == [] and marker["shard_error"].startswith("shard_unreadable"), marker
    samples, marker = read_all(tiny_models, tmp_path, tmp_path / "missing.tar")
    assert samples == [] and marker["shard_error"].startswith("shard_missing")


def test_blocks_are_bounded_by_read_batch_size(tiny_models, tmp_path):
    path = tmp_path / "s.tar"
    write_tar_shard(path, [m for k in range(20) for m in sample_members(f"k{k:02d}", "标题", k)])
    cfg = job_config(tiny_models, str(path), str(tmp_path / "out"))
    sizes = [b.num_rows for b in read_shards(pa.table({"shard": [str(path)]}), cfg)]
    assert sizes == [8, 8, 5]  # 20 samples in blocks of read.batch_size=8, the marker in the last one
