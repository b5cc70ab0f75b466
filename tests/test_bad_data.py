"""Every kind of broken input ends as the right per-sample row (or shard report); the good samples are embedded."""

import io
import struct
import tarfile
import zlib

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from conftest import job_config, rgb_image, sample_members
from pipeline.embed.demo import encode_image, write_tar_shard
from pipeline.embed.read import MARKER_POSITION, read_shards
from pipeline.embed.run import run_embed_job

CAPTION = "一张测试图片".encode()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's signature)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (120, 90), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rgb_image(320, 200, 3).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def palette_with_transparency() -> bytes:
    image = rgb_image(200, 150, 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    return encode_image(image, "PNG", transparency=0)


# key -> (members, expected status, expected error reason or warning fragment)
IMAGE_CASES = {
    "truncated_jpeg": (encode_image(rgb_image(400, 300, 1), "JPEG")[:2000], "error", "image_decode_failed"),
    "zero_bytes": (b"", "error", "image_empty"),
    "random_bytes": (np.random.default_rng(0).bytes(5000), "error", "image_decode_failed"),
    "png_named_jpg": (encode_image(rgb_image(300, 200, 2), "PNG"), "ok", None),
    "cmyk_jpeg": (encode_image(rgb_image(300, 200, 5).convert("CMYK"), "JPEG"), "ok", None),
    "palette_transparency": (palette_with_transparency(), "ok", None),
    "rgba": (encode_image(rgb_image(300, 200, 6).convert("RGBA"), "PNG"), "ok", None),
    "png16": (encode_image(Image.fromarray(np.full((100, 150), 40000, np.uint16)), "PNG"), "ok", None),
    "grayscale": (encode_image(rgb_image(300, 200, 7).convert("L"), "JPEG"), "ok", None),
    "animated_gif": (animated("GIF"), "ok", None),
    "animated_webp": (animated("WEBP"), "ok", None),
    "exif_rotated": (exif_rotated(), "ok", None),
    "tiny_1x1": (encode_image(rgb_image(1, 1, 8), "PNG"), "ok", None),
    "banner_4000x10": (encode_image(rgb_image(4000, 10, 9), "PNG"), "ok", None),
    "bomb": (png_claiming(100_000, 100_000), "error", "image_too_large"),
}
CAPTION_CASES = {
    "empty_caption": ("".encode(), "error", "empty_caption"),
    "long_caption": (("很长的标题" * 100).encode(), "ok", "caption_truncated"),
    "gbk_caption": ("一只在草地上的猫".encode("gbk"), "error", "caption_not_utf8"),
    "control_chars": ("标题\x00\x07\x1b中间".encode(), "ok", None),
    "emoji": ("😀🐱 一只猫 🌸".encode(), "ok", None),
}


def corpus_members() -> tuple[list[tuple[str, bytes]], dict[str, tuple[str, str | None]]]:
    members, expected = [], {}
    good = encode_image(rgb_image(320, 240, 11), "JPEG")
    for key, (image, status, reason) in IMAGE_CASES.items():
        members += [(f"{key}.jpg", image), (f"{key}.txt", CAPTION)]
        expected[key] = (status, reason)
    for key, (caption, status, reason) in CAPTION_CASES.items():
        members += [(f"{key}.jpg", good), (f"{key}.txt", caption)]
        expected[key] = (status, reason)
    members += [("missing_txt.jpg", good)]
    expected["missing_txt"] = ("error", "missing_caption")
    members += [("caption_only.txt", CAPTION)]
    expected["caption_only"] = ("error", "missing_image")
    members += [("extra.jpg", good), ("extra.txt", CAPTION), ("extra.pkl", b"\x80\x04cos\nsystem\n."),
                ("extra.pth", b"PK\x03\x04"), ("extra.npy", b"\x93NUMPY")]
    expected["extra"] = ("ok", "ignored members: npy, pkl, pth")
    members += [("bad_json.jpg", good), ("bad_json.txt", CAPTION), ("bad_json.json", b"{'url': nope")]
    expected["bad_json"] = ("ok", "bad_json")
    members += sample_members("good", "好的样本", 12)
    expected["good"] = ("ok", None)
    members += [("good.jpg", good), ("good.txt", CAPTION)]  # the key repeats later in the shard
    return members, expected


@pytest.mark.parametrize("decode_on", ["tasks", "encoder"])
def test_bad_samples_become_rows_beside_good_ones(local_ray, tiny_models, tmp_path, decode_on):
    """The same statuses and reasons whether images are decoded in the read tasks or in the encoder actor."""
    members, expected = corpus_members()
    shards = tmp_path / "shards"
    write_tar_shard(shards / "corpus.tar", members)
    # shard-level cases
    truncated = [m for k in range(4) for m in sample_members(f"t{k}", "截断", k)]
    write_tar_shard(shards / "truncated.tar", truncated)
    cut = [m.offset_data for m in tarfile.open(shards / "truncated.tar")][7] + 50
    (shards / "truncated.tar").write_bytes((shards / "truncated.tar").read_bytes()[:cut])
    with tarfile.open(shards / "empty.tar", "w"):
        pass
    (shards / "nottar.tar").write_bytes(b"<html>403 Forbidden</html>" * 50)
    out = tmp_path / "out"
    summary = run_embed_job(job_config(
        tiny_models, f"{shards}/{{corpus,truncated,empty,nottar,missing}}.tar", str(out), "read.max_image_pixels=50000000",
        f"read.decode_on={decode_on}"))

    table = pq.read_table(out / "embeddings" / "corpus.parquet")
    rows = table.to_pylist()
    assert [r["position"] for r in rows] == list(range(len(expected) + 1))
    by_key = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
    assert set(by_key) == set(expected)
    first_good, repeated_good = by_key.pop("good")
    assert first_good["status"] == "ok"
    assert repeated_good["status"] == "error" and repeated_good["error"].startswith("duplicate_key")
    for key, [row] in by_key.items():
        status, reason = expected[key]
        assert row["status"] == status, (key, row["error"])
        if status == "error":
            assert row["error"].startswith(reason), (key, row["error"])
            assert row["image_embedding"] is None and row["text_embedding"] is None and row["similarity"] is None
        else:
            assert row["error"] is None and row["similarity"] is not None, key
            assert abs(np.linalg.norm(np.array(row["image_embedding"], np.float32)) - 1) < 2e-3
            if reason:
                assert reason in row["warning"], (key, row["warning"])
    assert by_key["emoji"][0]["caption"] == "😀🐱 一只猫 🌸"
    assert by_key["gbk_caption"][0]["caption"] is None

    truncated_rows = pq.read_table(out / "embeddings" / "truncated.parquet").to_pylist()
    # the cut is inside t2's caption: t0, t1 embedded, t2 recorded as cut, t3 never reached the file
    assert [r["key"] for r in truncated_rows] == ["t0", "t1", "t2"]
    assert [r["status"] for r in truncated_rows] == ["ok", "ok", "error"]
    assert truncated_rows[2]["error"].startswith("shard_truncated")
    assert str(shards / "truncated.tar") in summary["truncated_shards"]
    assert pq.read_table(out / "embeddings" / "empty.parquet").num_rows == 0
    assert summary["failed_shards"][str(shards / "nottar.tar")].startswith("shard_unreadable")
    assert summary["failed_shards"][str(shards / "missing.tar")].startswith("shard_missing")
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["corpus.parquet", "empty.parquet",
                                                                      "truncated.parquet"]


class FlakyFileSystem(LocalFileSystem):
    """Local files over a connection that drops `failures` times, after `after_bytes` bytes each time."""

    protocol = "flaky"
    failures = 0
    after_bytes = 0
    opened = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        FlakyFileSystem.opened += 1
        if FlakyFileSystem.opened > FlakyFileSystem.failures:
            return f
        limit, read = FlakyFileSystem.after_bytes, f.read

        def dropping_read(n=-1):
            if f.tell() >= limit:
                raise ConnectionResetError("connection reset by peer (injected)")
            return read(n if 0 <= n <= limit - f.tell() else limit - f.tell())
        f.read = dropping_read
        return f


@pytest.fixture
def flaky(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.opened = 0
    return FlakyFileSystem


def test_a_shard_unreadable_for_a_while_is_read_once_and_whole(tiny_models, tmp_path, flaky):
    path = tmp_path / "s.tar"
    write_tar_shard(path, [m for k in range(12) for m in sample_members(f"k{k:02d}", "标题", k)])
    flaky.failures, flaky.after_bytes = 2, path.stat().st_size // 3  # drops twice, a third of the way in
    cfg = job_config(tiny_models, f"flaky://{path}", str(tmp_path / "out"), "read.attempts=3")
    rows = pa.concat_tables(read_shards(pa.table({"shard": [f"flaky://{path}"]}), cfg)).to_pylist()
    samples = [r for r in rows if r["position"] != MARKER_POSITION]
    assert [r["key"] for r in samples] == [f"k{k:02d}" for k in range(12)]
    assert [r["position"] for r in samples] == list(range(12))
    assert rows[-1]["shard_samples"] == 12 and rows[-1]["shard_error"] is None
    assert flaky.opened == 3

    flaky.opened, flaky.failures = 0, 5  # longer than read.attempts: reported, not raised
    rows = pa.concat_tables(read_shards(pa.table({"shard": [f"flaky://{path}"]}), cfg)).to_pylist()
    assert rows[-1]["shard_error"].startswith("shard_read_failed after 3 attempts: ConnectionResetError")
