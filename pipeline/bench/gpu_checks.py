"""The CUDA paths of read.decode_on=encoder and of the encoder, checked on the GPU itself, without pytest.

The GPU run is one command, so these are part of it: `python jobs/benchmark.py --config
configs/benchmark-gpu.yaml` runs them first and reports them with its figures (a GPU box without the test
extra's packages needs no pytest for them); tests/test_gpu.py runs the same checks under pytest wherever a
GPU is present (and, as a dry run of the checks' own code, on CPU).
Each check takes the device to check ("cuda"; "cpu" for the dry run) and raises AssertionError on a failure.
"""

from __future__ import annotations

import threading
import time
import traceback
from multiprocessing import get_context

import numpy as np
from PIL import Image

from pipeline.bench.photos import benchmark_photos, corrupted_jpegs
from pipeline.config import JobCfg
from pipeline.embed.demo import encode_image, shape_image
from pipeline.embed.image import MAX_EXACT_ASPECT, SampleError, decode_image

SIZE, MAX_PIXELS = 224, 50_000_000
# (width, height): downscaling and upscaling, both orientations, 1-pixel sides, sizes at the crop, and the
# extreme aspect ratios up to the exact path's limit (MAX_EXACT_ASPECT); both sides of Pillow's choice of pass
# order (resize.vertical_first), and tall images that grow. tests/test_resize.py checks them against PIL.
SHAPES = [(640, 480), (480, 640), (1000, 700), (333, 1001), (97, 61), (37, 300), (3, 3), (1, 1), (1, 20), (20, 1),
          (224, 224), (225, 224), (224, 500), (500, 224), (300, 299), (2048, 1536),
          (SIZE * MAX_EXACT_ASPECT, SIZE), (SIZE, SIZE * MAX_EXACT_ASPECT), (20 * 50, 50), (11, 11 * 20),
          (230, 460), (230, 461), (225, 451), (333, 1001), (100, 250), (50, 101)]


def generated(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like scene where it is large enough, noise where it is tiny (every pixel counts there)."""
    if min(width, height) >= 8:
        return shape_image((40 * seed % 255, 120, 200), ["ellipse", "rectangle", "polygon"][seed % 3],
                           (width, height), seed)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def shapes_as_tensors():
    import torch

    return [torch.from_numpy(np.array(generated(w, h, seed).convert("RGB"))).permute(2, 0, 1).contiguous()
            for seed, (w, h) in enumerate(SHAPES)]


def exact_reason(payload: bytes) -> str | None:
    try:
        decode_image(payload, SIZE, MAX_PIXELS)
    except SampleError as exc:
        return str(exc)
    return None


def check_resize_same_bytes_as_on_cpu(device: str, cfg: JobCfg | None = None) -> None:
    """The batched resize on the device gives the CPU's bytes (the CPU's are PIL's: tests/test_resize.py), whole
    and in chunks under a small budget."""
    from pipeline.embed.resize import resize_center_crop_batch

    images = shapes_as_tensors()
    on_cpu = resize_center_crop_batch(images, SIZE)
    on_device = resize_center_crop_batch([i.to(device) for i in images], SIZE)
    assert on_device.device.type == device, on_device.device
    differing = [int((a.cpu() != b).sum()) for a, b in zip(on_device, on_cpu)]
    assert differing == [0] * len(images), f"differing bytes per image: {dict(zip(SHAPES, differing))}"
    chunked = resize_center_crop_batch([i.to(device) for i in images], SIZE, budget=1_000_000)
    assert bool((chunked == on_device).all()), "chunks under a budget give other bytes"


def check_fused_resize_same_bytes_as_torch(device: str, cfg: JobCfg | None = None) -> None:
    """read.device_resize=triton: the fused kernels give the torch version's bytes on the device, whole and in
    chunks. (On CPU, the dry run, nothing: the kernels need a GPU or Triton's interpreter, which
    tests/test_resize_kernel.py runs.)"""
    if device != "cuda":
        return
    from pipeline.embed.resize import resize_center_crop_batch

    images = [i.to(device) for i in shapes_as_tensors()]
    torch_bytes = resize_center_crop_batch(images, SIZE)
    for budget in (1 << 27, 1_000_000):
        fused = resize_center_crop_batch(images, SIZE, budget=budget, kernel="triton")
        differing = [int((a != b).sum()) for a, b in zip(fused, torch_bytes)]
        assert differing == [0] * len(images), f"budget {budget}, differing bytes: {dict(zip(SHAPES, differing))}"


def check_resize_queues_without_waiting(device: str, cfg: JobCfg | None = None) -> None:
    """The resize (each kernel, whole and in chunks) and the decoder's placing of the read tasks' pixels queue
    their device work without a call that makes the host wait for the device (pipeline/embed/transfer.py):
    torch.cuda.set_sync_debug_mode("error") raises on any. (On CPU, the dry run, the same calls, unwatched.)"""
    import pyarrow as pa
    import torch

    from pipeline.embed.device_decode import DeviceDecoder
    from pipeline.embed.resize import resize_center_crop_batch

    images = [i.to(device) for i in shapes_as_tensors()]
    ready = np.random.default_rng(3).integers(0, 255, (3, SIZE, SIZE, 3), dtype=np.uint8)
    pixels = pa.array([ready[0].tobytes(), None, ready[1].tobytes(), ready[2].tobytes()], pa.binary(SIZE * SIZE * 3))
    decoder = DeviceDecoder(torch.device(device), SIZE, MAX_PIXELS)

    def batch_path():  # the decoder's images, with the read tasks' pixels placed
        for kernel in ["torch"] + (["triton"] if device == "cuda" else []):
            for budget in (1 << 27, 1_000_000):
                resize_center_crop_batch(images, SIZE, budget=budget, kernel=kernel)
        placed, errors = decoder(pa.array([b"", None, b"", b""], pa.binary()), [0, 0, 0, 0], pixels)
        assert errors == [None, "image_empty: zero-byte image member", None, None], errors
        return placed

    batch_path()  # first calls (kernel compiles, allocator growth) unwatched
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        placed = batch_path()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert bool((placed[[0, 2, 3]].permute(0, 2, 3, 1).cpu() == torch.from_numpy(ready)).all())


def check_device_decode_in_one_batch(device: str, cfg: JobCfg | None = None) -> None:
    """Baseline JPEGs take the device decoder (nvJPEG on CUDA) in one call, none on the CPU; the pixels are close
    to the exact path's (nvJPEG's IDCT and chroma upsampling differ from libjpeg's: BENCHMARKS.md, "GPU")."""
    import torch

    from pipeline.embed.device_decode import DeviceDecoder

    payloads = benchmark_photos(48, seed=11)
    decoder = DeviceDecoder(torch.device(device), SIZE, MAX_PIXELS)
    images, errors = decoder(payloads)
    assert decoder.backend == ("nvjpeg" if device == "cuda" else "pil"), decoder.backend
    assert errors == [None] * len(payloads), errors
    assert (decoder.on_device, decoder.on_cpu, decoder.decode_calls) == (len(payloads), 0, 1), (
        decoder.on_device, decoder.on_cpu, decoder.decode_calls)
    exact = np.stack([decode_image(p, SIZE, MAX_PIXELS) for p in payloads])
    levels = np.abs(images.permute(0, 2, 3, 1).cpu().numpy().astype(int) - exact.astype(int))
    assert levels.mean() < 2, f"pixels {levels.mean():.2f} levels from the exact path on average"


def check_corrupted_jpegs_get_the_exact_rows(device: str, cfg: JobCfg | None = None) -> None:
    """JPEGs corrupted anywhere after their first bytes: the device path gives each the exact path's error (or
    none), whatever the device decoder would make of them."""
    import torch

    from pipeline.embed.device_decode import DeviceDecoder

    payloads = corrupted_jpegs(300, seed=9)
    _, errors = DeviceDecoder(torch.device(device), SIZE, MAX_PIXELS)(payloads)
    expected = [exact_reason(p) for p in payloads]
    wrong = [(i, got, want) for i, (got, want) in enumerate(zip(errors, expected)) if got != want]
    assert not wrong, f"{len(wrong)} of {len(payloads)} rows differ from the exact path's, e.g. {wrong[:3]}"


def check_decode_chunks_under_the_pixel_budget(device: str, cfg: JobCfg | None = None) -> None:
    """A batch of large images decoded in chunks under read.device_decode_pixels gives the bytes of one call."""
    import torch

    from pipeline.embed.device_decode import DeviceDecoder

    sizes = [(1600, 1200), (640, 480), (2000, 1000), (300, 299), (1200, 1600)]
    payloads = [encode_image(shape_image((90, 120, 200), "ellipse", size, seed), "JPEG", quality=90)
                for seed, size in enumerate(sizes)]
    whole = DeviceDecoder(torch.device(device), SIZE, MAX_PIXELS)
    chunked = DeviceDecoder(torch.device(device), SIZE, MAX_PIXELS, chunk_pixels=2_500_000)
    images = chunked(payloads)[0]
    assert chunked.decode_calls == 3, chunked.decode_calls  # [1600x1200, 640x480], [2000x1000, 300x299], [1200x1600]
    assert bool((images == whole(payloads)[0]).all()) and whole.decode_calls == 1


def encoder_and_inputs(device: str, cfg: JobCfg, seed: int):
    """An Encoder of cfg's towers on `device` at batch 64 (pixels given, as decode_on=tasks), and 128 rows of
    random pixels and Wukong-like captions' token ids."""
    import dataclasses

    from pipeline.bench.photos import caption
    from pipeline.embed.encode import Encoder
    from pipeline.embed.model import decide_random_weights
    from pipeline.embed.preprocess import load_tokenizer, resolve_tokenizer, tokenize

    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, device=device, batch_size=64),
                              read=dataclasses.replace(cfg.read, decode_on="tasks"))
    random_weights = decide_random_weights(cfg)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (128, SIZE, SIZE, 3), dtype=np.uint8)
    ids = tokenize(load_tokenizer(*resolve_tokenizer(cfg, random_weights)), [caption(rng) for _ in range(128)])
    return Encoder(cfg, random_weights), pixels, ids


def on_two_threads(encoder, run) -> list:
    """[run(0), run(1)], run at once on two threads, each with its own CUDA stream (two batches in flight)."""
    results: list = [None, None]

    def in_flight(i: int) -> None:
        with encoder._stream():
            results[i] = run(i)

    threads = [threading.Thread(target=in_flight, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(result is None for result in results):
        raise AssertionError("a batch in flight failed (see its thread's traceback above)")
    return results


def assert_close(ours, theirs, what: str) -> None:
    for a, b in zip(ours, theirs):
        assert np.abs(a - b).max() <= 1e-3, f"{what}: {np.abs(a - b).max():.2e} apart"


def check_encoder_fixed_shape_and_streams(device: str, cfg: JobCfg) -> None:
    """The towers see encoder.batch_size rows whatever the batch; a row's embedding does not depend on its batch;
    two batches in flight on two threads (each its own CUDA stream) give what they give one at a time."""
    encoder, pixels, ids = encoder_and_inputs(device, cfg, seed=0)
    seen = []
    encoder.image_model.register_forward_pre_hook(lambda m, a, kw: seen.append(len(kw["pixel_values"])),
                                                  with_kwargs=True)
    full = encoder.embed(pixels[:64], ids[:64])
    partial = encoder.embed(pixels[:10], ids[:10])
    assert set(seen) == {64}, seen
    assert_close(partial, [b[:10] for b in full], "a partial batch's rows against the same rows in a full one")
    alone = [encoder.embed(pixels[i * 64 : (i + 1) * 64], ids[i * 64 : (i + 1) * 64]) for i in range(2)]
    together = on_two_threads(encoder, lambda i: encoder.embed(pixels[i * 64 : (i + 1) * 64], ids[i * 64 : (i + 1) * 64]))
    for i in range(2):
        assert_close(together[i], alone[i], f"batch {i} in flight with another against alone")


def check_cuda_graphs_give_the_eager_embeddings(device: str, cfg: JobCfg) -> None:
    """encoder.cuda_graphs: each thread captures its own graphs (no capture failure), and full, partial and
    concurrent batches give the eager towers' embeddings. On CPU (the dry run) only the eager side runs."""
    encoder, pixels, ids = encoder_and_inputs(device, cfg, seed=1)
    eager = [encoder.embed(pixels[i * 64 : (i + 1) * 64], ids[i * 64 : (i + 1) * 64]) for i in range(2)]
    eager_partial = encoder.embed(pixels[:10], ids[:10])
    if device != "cuda":
        return
    encoder.cuda_graphs = True

    def graphed(i: int):
        encoder.embed(pixels[i * 64 : (i + 1) * 64], ids[i * 64 : (i + 1) * 64])  # captures this thread's graphs
        return (encoder.embed(pixels[i * 64 : (i + 1) * 64], ids[i * 64 : (i + 1) * 64]),
                encoder.embed(pixels[:10], ids[:10]), dict(encoder._thread.graphs))

    results = on_two_threads(encoder, graphed)
    for i, (full, partial, graphs) in enumerate(results):
        assert set(graphs) == {"image", "text"} and not any(g.failed for g in graphs.values()), graphs
        assert_close(full, eager[i], f"batch {i}, graphed against eager")
        assert_close(partial, eager_partial, "a partial batch, graphed against eager")
    assert results[0][2]["image"] is not results[1][2]["image"]  # one graph per thread


CHECKS = {check.__name__.removeprefix("check_"): check for check in (
    check_resize_same_bytes_as_on_cpu, check_fused_resize_same_bytes_as_torch, check_resize_queues_without_waiting,
    check_device_decode_in_one_batch,
    check_corrupted_jpegs_get_the_exact_rows, check_decode_chunks_under_the_pixel_budget, check_encoder_fixed_shape_and_streams,
    check_cuda_graphs_give_the_eager_embeddings)}


def run_gpu_checks(cfg: JobCfg, device: str = "cuda", checks: dict | None = None, timeout_s: float = 300.0) -> dict:
    """{check: "passed" or the failure} for `checks` (CHECKS) on `device`; {"skipped": reason} for CUDA where
    torch sees no GPU.

    The checks run in a spawned process of their own: a check that breaks the CUDA context (a sticky error,
    a crash in a decoder) costs the checks after it, never the benchmark that runs them first."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU visible to torch"}
    checks = CHECKS if checks is None else checks
    context = get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)  # a send is written at once: a crash after it loses nothing
    process = context.Process(target=checks_in_this_process, args=(checks, device, cfg, sender), daemon=True)
    process.start()
    sender.close()
    results, deadline, gone = {}, time.monotonic() + timeout_s, False
    while len(results) < len(checks) and time.monotonic() < deadline:
        if not receiver.poll(1.0):
            continue
        try:
            name, result = receiver.recv()
        except EOFError:  # the process is gone (it may still be exiting: its pipe closes first)
            gone = True
            break
        results[name] = result
    timed_out = len(results) < len(checks) and not gone
    process.join(timeout=0 if timed_out else 30)
    if process.is_alive():
        process.kill()
    why = f"over {timeout_s:g} s" if timed_out else f"the check process exited with {process.exitcode}"
    return {name: results.get(name, f"NOT RUN: {why}") for name in checks}


def checks_in_this_process(checks: dict, device: str, cfg: JobCfg, sender) -> None:
    for name, check in checks.items():
        try:
            check(device, cfg)
            sender.send((name, "passed"))
        except Exception:  # noqa: BLE001 - every check runs and is reported
            sender.send((name, "FAILED: " + traceback.format_exc(limit=3)[-1500:]))
