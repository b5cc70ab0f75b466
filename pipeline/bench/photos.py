"""The benchmarks' generated data: photo-like JPEGs (crops of real photographs, textured scenes) and Wukong-like
Chinese captions, written as WebDataset shards once and cached."""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.embed.demo import encode_image, real_photographs, write_tar_shard

SUBJECTS = ["一只橘猫", "两个孩子", "一位老人", "一辆红色的汽车", "一碗牛肉面", "一座古老的寺庙", "一片金黄的麦田",
            "城市的天际线", "一只白色的小狗", "穿着汉服的女孩", "一杯咖啡", "雪山下的湖泊", "一艘渔船", "樱花树"]
SCENES = ["在阳光下", "在雨中的街道上", "在夜晚的灯光里", "在海边", "在公园的草地上", "在厨房的桌子上",
          "在山顶", "在古镇的小巷里", "在冬天的雪地里", "在热闹的市场里"]
DETAILS = ["高清摄影", "背景虚化", "色彩鲜艳", "黑白照片", "航拍视角", "特写镜头", "复古风格", "壁纸", "免费素材",
           "旅游攻略", "美食推荐", "家居装饰", "设计灵感"]


def caption(rng: np.random.Generator) -> str:
    """Wukong-like Chinese captions: a subject and scene, often with the tags web alt-texts carry (8-60 chars)."""
    text = rng.choice(SUBJECTS) + rng.choice(SCENES)
    for _ in range(rng.integers(0, 5)):
        text += "，" + rng.choice(DETAILS)
    return text


def photo_like(rng: np.random.Generator, photos: list[Image.Image]) -> Image.Image:
    """200-1000 px per side: random crops of real photographs, or generated scenes with texture and edges."""
    width, height = (int(v) for v in rng.integers(200, 1001, 2))
    if rng.random() < 0.5 and photos:  # without photos: always a generated scene
        photo = photos[rng.integers(len(photos))]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x, y, x + cw, y + ch)).resize((width, height), Image.Resampling.BICUBIC)
        return Image.fromarray(np.clip(np.asarray(image) * rng.uniform(0.7, 1.3, 3), 0, 255).astype(np.uint8))
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([rng.uniform(40, 220) + rng.uniform(-80, 80) * np.sin(xx * rng.uniform(1, 8) + c)
                     * np.cos(yy * rng.uniform(1, 8)) for c in range(3)], -1)
    base += rng.normal(0, rng.uniform(4, 20), base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 12)):
        box = sorted(rng.integers(0, width, 2)) + sorted(rng.integers(0, height, 2))
        draw.ellipse((box[0], box[2], box[1], box[3]), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def benchmark_photo(rng: np.random.Generator, photos: list[Image.Image]) -> bytes:
    """One photo-like JPEG at quality 75-95, as web images are saved."""
    buf = io.BytesIO()
    photo_like(rng, photos).save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def benchmark_photos(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    photos = [p for p, _ in real_photographs()]
    return [benchmark_photo(rng, photos) for _ in range(n)]


PHOTO_POOL = 2048  # distinct photos at most; larger runs reuse them (decode cost depends on the JPEG, not its key)


def _photo_chunk(seed: int, n: int) -> list[bytes]:
    return benchmark_photos(n, seed)


def photo_pool(n: int, seed: int) -> list[bytes]:
    """n benchmark photos, generated on every core (a GPU run needs tens of thousands of pairs in seconds)."""
    chunks = [(seed * 1_000 + c, min(64, n - start)) for c, start in enumerate(range(0, n, 64))]
    if len(chunks) == 1:
        return _photo_chunk(*chunks[0])
    with ProcessPoolExecutor(min(len(chunks), os.cpu_count() or 1), mp_context=get_context("spawn")) as pool:
        return [photo for chunk in pool.map(_photo_chunk, *zip(*chunks)) for photo in chunk]


def make_benchmark_shards(folder: Path, n_shards: int, per_shard: int, seed: int = 0) -> list[Path]:
    """Shards of photo-like JPEGs (quality 75-95) and captions, written once and reused (cached) across runs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{s:05d}.tar" for s in range(n_shards)]
    missing = [s for s, path in enumerate(paths) if not path.exists()]
    if not missing:
        return paths
    photos = photo_pool(min(n_shards * per_shard, PHOTO_POOL), seed)
    for s in missing:
        rng = np.random.default_rng(seed * 100_003 + s)
        members = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            photo = photos[(s * per_shard + i) % len(photos)]
            members += [(f"{key}.jpg", photo), (f"{key}.txt", caption(rng).encode()),
                        (f"{key}.json", json.dumps({"url": f"https://example.com/{key}.jpg"}).encode())]
        write_tar_shard(paths[s], members)
    return paths


def corrupted_jpegs(count: int, seed: int) -> list[bytes]:
    """Baseline JPEGs with a run of bytes overwritten or cut out after their first 20 bytes: headers, tables,
    compressed data."""
    rng = np.random.default_rng(seed)
    corrupted = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(40, 400, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8) if i % 2 else np.tile(
            np.linspace(0, 255, width, dtype=np.uint8)[None, :, None], (height, 1, 3))
        payload = bytearray(encode_image(Image.fromarray(pixels), "JPEG", quality=int(rng.integers(60, 95)),
                                         subsampling=int(rng.integers(0, 3))))
        at, length = int(rng.integers(20, len(payload) - 100)), int(rng.integers(1, 100))
        if i % 3 == 2:
            del payload[at : at + length]
        else:
            payload[at : at + length] = rng.bytes(length)
        corrupted.append(bytes(payload))
    return corrupted
