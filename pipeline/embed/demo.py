"""Sample shards for the demo: real photographs shipped with matplotlib plus generated images, Chinese captions."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import JobCfg

log = logging.getLogger(__name__)

# where the demo config's sample shards live (configs/demo.yaml's input): the only place they are written
DEMO_INPUT = "demo_data/shards/{00000..00002}.tar"
COLORS = {"红色": (220, 40, 40), "蓝色": (40, 80, 220), "绿色": (40, 170, 70), "黄色": (240, 210, 40),
          "紫色": (140, 60, 170), "橙色": (250, 140, 30)}
SHAPES = {"圆形": "ellipse", "正方形": "rectangle", "三角形": "polygon"}


def write_tar_shard(path: str | Path, members: list[tuple[str, bytes]]) -> None:
    """A WebDataset shard: members in the given order, as img2dataset writes them."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))


def encode_image(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def shape_image(color: tuple[int, int, int], shape: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A coloured shape on a soft noisy background, photo-like enough for JPEG to behave as on real data."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    background = np.stack([200 + 40 * np.sin(x / w * 3 + c) * np.cos(y / h * 2) for c in range(3)], -1)
    background += rng.normal(0, 8, background.shape)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    box = (w * 0.25, h * 0.25, w * 0.75, h * 0.75)
    if shape == "polygon":
        draw.polygon([(w * 0.5, h * 0.2), (w * 0.8, h * 0.8), (w * 0.2, h * 0.8)], fill=color)
    else:
        getattr(draw, shape)(box, fill=color)
    return image


def real_photographs() -> list[tuple[Image.Image, str]]:
    """Photographs that ship inside matplotlib's wheel (sample_data), with Chinese captions."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return [
        (Image.open(folder / "grace_hopper.jpg").convert("RGB"), "一位身穿海军制服的女士的肖像照片"),
        (Image.open(folder / "Minduka_Present_Blue_Pack.png").convert("RGB"), "一个系着丝带的蓝色礼物包装盒"),
    ]


def demo_samples(shard_index: int, per_shard: int) -> list[dict]:
    """WebDataset samples ({"__key__", "jpg", "txt", "json"}) for one demo shard, with two broken on purpose."""
    samples: list[dict] = []
    photos = real_photographs()
    color_names, shape_names = list(COLORS), list(SHAPES)
    for i in range(per_shard):
        key = f"{shard_index:05d}{i:04d}"
        n = shard_index * per_shard + i
        if i < len(photos):
            image, caption = photos[i]
        else:
            color, shape = color_names[n % len(color_names)], shape_names[n % len(shape_names)]
            size = (320 + 37 * (n % 9), 240 + 53 * (n % 7))
            image, caption = shape_image(COLORS[color], SHAPES[shape], size, n), f"浅色背景上的一个{color}{shape}"
        sample = {"__key__": key, "jpg": encode_image(image, quality=85)}
        if not (i == per_shard - 1 and shard_index == 0):  # else no caption: an `error` row (missing_caption)
            sample["txt"] = caption.encode("utf-8")
            sample["json"] = json.dumps({"url": f"https://example.com/demo/{key}.jpg", "caption": caption},
                                        ensure_ascii=False).encode()
        samples.append(sample)
    if shard_index == 1:
        samples.append({"__key__": f"{shard_index:05d}9999", "jpg": b"\xff\xd8\xff\xe0 this is not really a jpeg",
                        "txt": "一张损坏的图片".encode()})
    return samples


def write_samples(path: Path, samples: list[dict]) -> None:
    """A shard written by webdataset's own TarWriter, as img2dataset and WebDataset users write them."""
    import webdataset

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream, webdataset.TarWriter(stream, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)


def make_demo_shards(cfg: JobCfg, per_shard: int = 16) -> list[Path]:
    """Write the demo's sample shards at their own path (DEMO_INPUT), when none of them exists yet.

    Any other `input` gets nothing written, whatever `make_demo_shards` says: a typo of the demo's path,
    or the demo config pointed at real data, must fail as a missing input, not be filled with made-up samples.
    """
    from braceexpand import braceexpand

    if cfg.input != DEMO_INPUT:
        log.warning("make_demo_shards: input %s is not the demo's own %s; no demo shards written",
                    cfg.input, DEMO_INPUT)
        return []
    paths = [Path(p) for p in braceexpand(cfg.input)]
    if any(p.exists() for p in paths):
        log.info("demo shards: using the existing files of %s", cfg.input)
        return paths
    for index, path in enumerate(paths):
        write_samples(path, demo_samples(index, per_shard))
    log.info("demo shards written: %s", ", ".join(map(str, paths)))
    return paths
