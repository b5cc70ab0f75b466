"""The CPU stage's own speed: decode + resize + tokenize per core on each decode path, and the GPU's decode rate."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.bench.samplers import gpu_available
from pipeline.config import JobCfg
from pipeline.embed.image import decode_image
from pipeline.embed.preprocess import decode_caption, load_tokenizer, tokenize
from pipeline.embed.read import RawSample, read_shard


# images the CPU rate of decode_on=encoder is measured on: it runs ~10 per second per core at 200-1000 px
# (measured on this project's 2-core CI machine), so a GPU config's shard of 256 would cost the 5-minute GPU
# run ~25 s for a figure about CPUs
STAND_IN_IMAGES = 64


def decode_rate_per_core(cfg: JobCfg, shard: Path, tokenizer: tuple[str, str | None]) -> dict:
    """Decode + resize + tokenize, one process, one thread: samples per second per core, on each decode path
    (decode_on=tasks: PIL; decode_on=encoder on CPU: PIL decode + the batched resize, on the shard's first
    STAND_IN_IMAGES images). On a GPU, also the device
    path's images per second on the GPU, in batches of encoder.batch_size."""
    import torch

    from pipeline.embed.device_decode import DeviceDecoder

    samples = [s for s in read_shard(str(shard), cfg) if isinstance(s, RawSample)]
    payloads = [s.members["jpg"] for s in samples]
    size, max_pixels = cfg.read.image_size, cfg.read.max_image_pixels
    tok = load_tokenizer(*tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        for payload in payloads:
            decode_image(payload, size, max_pixels)
        decoded = time.perf_counter()
        tokenize(tok, [decode_caption(s.members["txt"]) for s in samples])
        tokenized = time.perf_counter()
        # the GPU path's CPU stand-in is slow (torch's gathers on one core): its rate from a few of the images
        stand_in = payloads[:STAND_IN_IMAGES]
        DeviceDecoder(torch.device("cpu"), size, max_pixels)(stand_in)
        device_path = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    rates = {"decode_images_per_s_per_core": round(len(samples) / (decoded - started), 1),
             "tokenize_captions_per_s_per_core": round(len(samples) / (tokenized - decoded), 1),
             "encoder_path_on_cpu_images_per_s_per_core": round(len(stand_in) / (device_path - tokenized), 1),
             "mean_jpeg_kb": round(float(np.mean([len(p) for p in payloads])) / 1024, 1)}
    if gpu_available():
        batch = (payloads * (cfg.encoder.batch_size // len(payloads) + 1))[: cfg.encoder.batch_size]
        rates["gpu_decode_resize_images_per_s"] = gpu_rate(batch, size, max_pixels, "torch")
        try:  # read.device_resize=triton: which resize is faster decides the config's default
            rates["gpu_decode_resize_triton_images_per_s"] = gpu_rate(batch, size, max_pixels, "triton")
        except Exception as exc:  # noqa: BLE001 - no triton here, or a kernel that fails: said, not fatal
            rates["gpu_decode_resize_triton_images_per_s"] = f"FAILED: {type(exc).__name__}: {exc}"[:500]
    return rates


def gpu_rate(batch: list[bytes], size: int, max_pixels: int, resize: str, seconds: float = 3.0) -> float:
    """Images per second of the device path (DeviceDecoder on CUDA, read.device_resize=`resize`), one thread."""
    import torch

    from pipeline.embed.device_decode import DeviceDecoder

    decoder = DeviceDecoder(torch.device("cuda"), size, max_pixels, resize=resize)
    decoder(batch)  # warm-up: nvJPEG handles, kernels (Triton compiles its kernels here)
    torch.cuda.synchronize()
    started, batches = time.perf_counter(), 0
    while batches < 3 or time.perf_counter() - started < seconds:
        decoder(batch)
        batches += 1
    torch.cuda.synchronize()
    return round(batches * len(batch) / (time.perf_counter() - started), 1)
