"""Benchmark: the encoders' ceiling against the whole embed job, same machine, weights, precision and data."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import psutil
from PIL import Image, ImageDraw, ImageFilter

from pipeline.config import JobCfg, actor_range, resolve_actors
from pipeline.demo import real_photographs, write_tar_shard
from pipeline.preprocess import decode_caption, decode_image, load_tokenizer, resolve_tokenizer, tokenize
from pipeline.read import RawSample, read_shard

log = logging.getLogger(__name__)

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


def decode_rate_per_core(cfg: JobCfg, shard: Path, tokenizer: tuple[str, str | None]) -> dict:
    """Decode + resize + tokenize, one process, one thread: samples per second per core, on each decode path
    (decode_on=tasks: PIL; decode_on=encoder on CPU: PIL decode + torch's resize). On a GPU, also the device
    path's images per second on the GPU, in batches of encoder.batch_size."""
    import torch

    from pipeline.device_decode import DeviceDecoder

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
        DeviceDecoder(torch.device("cpu"), size, max_pixels)(payloads)
        device_path = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    rates = {"decode_images_per_s_per_core": round(len(samples) / (decoded - started), 1),
             "tokenize_captions_per_s_per_core": round(len(samples) / (tokenized - decoded), 1),
             "encoder_path_on_cpu_images_per_s_per_core": round(len(samples) / (device_path - tokenized), 1),
             "mean_jpeg_kb": round(float(np.mean([len(p) for p in payloads])) / 1024, 1)}
    if gpu_available():
        decoder = DeviceDecoder(torch.device("cuda"), size, max_pixels)
        batch = (payloads * (cfg.encoder.batch_size // len(payloads) + 1))[: cfg.encoder.batch_size]
        decoder(batch)  # warm-up: nvJPEG handles, kernels
        torch.cuda.synchronize()
        started, batches = time.perf_counter(), 0
        while batches < 3 or time.perf_counter() - started < 3:
            decoder(batch)
            batches += 1
        torch.cuda.synchronize()
        rates["gpu_decode_resize_images_per_s"] = round(batches * len(batch) / (time.perf_counter() - started), 1)
    return rates


class CeilingProbe:
    """A Ray actor with the encoder actors' resources: the two towers on ready tensors, nothing else."""

    def __init__(self, cfg: JobCfg, random_weights: bool):
        from pipeline.encode import Encoder

        started = time.perf_counter()
        self.encoder = Encoder(cfg, random_weights)
        self.load_s = time.perf_counter() - started
        self.batch_size = cfg.encoder.batch_size
        self.size = cfg.read.image_size

    def measure(self, input_ids: np.ndarray, min_seconds: float, min_batches: int) -> dict:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (self.batch_size, self.size, self.size, 3), dtype=np.uint8)
        images = self.encoder.to_device(pixels).permute(0, 3, 1, 2)  # ready on the device, as decoded there
        ids = input_ids[: self.batch_size]
        for _ in range(2):  # warm-up: allocator, kernel selection (bf16 oneDNN primitives), caches
            self.encoder.embed(images, ids)
        batches, started = 0, time.perf_counter()
        while batches < min_batches or time.perf_counter() - started < min_seconds:
            self.encoder.embed(images, ids)
            batches += 1
        elapsed = time.perf_counter() - started
        return {"pairs_per_s": round(batches * self.batch_size / elapsed, 3), "batches": batches,
                "model_load_s": round(self.load_s, 3), "device": str(self.encoder.device)}


class MemorySampler:
    """Memory of this process and all its descendants: the driver, Ray's GCS, raylet, object store and every
    worker of the local Ray started here.

    Two figures: the peak of the total PSS (shared pages counted once), sampled every `interval_s`, which
    can miss a peak shorter than that; and the sum of each process's own peak RSS (Linux VmHWM, reset when
    sampling starts), which misses nothing but counts shared pages once per process.
    """

    def __init__(self, interval_s: float = 2.0):
        self.interval_s, self.peak_bytes, self._stop = interval_s, 0, threading.Event()
        self.peak_rss: dict[int, int] = {}
        self.names: dict[int, str] = {}  # pid -> process title (Ray workers: ray::TaskName)
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _processes() -> list[psutil.Process]:
        me = psutil.Process()
        return [me, *me.children(recursive=True)]

    def _sample(self) -> None:
        total = 0
        for proc in self._processes():
            try:
                total += proc.memory_full_info().pss
                self.peak_rss[proc.pid] = max(self.peak_rss.get(proc.pid, 0), peak_rss_bytes(proc.pid))
                self.names.setdefault(proc.pid, " ".join(proc.cmdline()[:1]) or proc.name())
            except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                pass
        self.peak_bytes = max(self.peak_bytes, total)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    @property
    def peak_rss_sum_bytes(self) -> int:
        return sum(self.peak_rss.values())

    def __enter__(self):
        for proc in self._processes():  # forget peaks from before: earlier runs in the same Ray workers
            with contextlib.suppress(OSError):
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()  # the high-water marks of processes still alive, up to the end


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size since start or its last reset (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def end_to_end(cfg: JobCfg, shards: list[Path], out: Path, use_ray: bool, random_weights: bool,
               tokenizer: tuple[str, str | None], memory_interval_s: float = 10.0) -> dict:
    """The embed job on `shards` (with Ray), or its stages driven in this process (without Ray). Reading every
    process's PSS costs the driver ~40 ms a time, taken from the encoders: timed runs sample it rarely, the
    memory-scaling runs often."""
    with MemorySampler(memory_interval_s) as memory, GpuBusySampler() as gpu:
        if use_ray:
            from pipeline.run import run_embed_job

            input_url = "{" + ",".join(str(p) for p in shards) + "}" if len(shards) > 1 else str(shards[0])
            wait_for_actors_to_exit()
            summary = run_embed_job(dataclasses.replace(cfg, input=input_url, output=str(out), overwrite=True))
            figures = {"pairs": summary["samples"], "ok": summary["ok"], "wall_s": summary["wall_s"],
                       "startup_s": summary.get("startup_s"), "steady_pairs_per_s": summary.get("steady_pairs_per_s"),
                       "whole_run_pairs_per_s": summary["pairs_per_s"], "steady_window": summary.get("steady_window"),
                       "ray": True}
            parquet = list((out / "embeddings").glob("*.parquet"))
        else:
            from pipeline.inprocess import run_without_ray

            figures = run_without_ray(cfg, [str(p) for p in shards], random_weights, tokenizer, out)
            parquet = list(out.glob("*.parquet"))
    figures["gpu_busy_steady"] = gpu.busy_fraction(*figures["steady_window"]) if figures["steady_window"] else None
    figures.update({"peak_memory_mib": round(memory.peak_bytes / 2**20, 1),
                    "peak_rss_sum_mib": round(memory.peak_rss_sum_bytes / 2**20, 1),
                    "parquet_bytes_per_pair": round(sum(p.stat().st_size for p in parquet) / max(figures["pairs"], 1), 1)})
    return figures


class GpuBusySampler:
    """GPU 0's utilisation from NVML (the share of time a kernel was running) every 0.1 s, for the fraction of
    the steady window the GPU was busy. Without a GPU or NVML, busy_fraction is None."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.samples, self._stop = interval_s, [], threading.Event()
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # noqa: BLE001 - no NVML library, no driver, no GPU: nothing to sample
            self._handle = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):
                self.samples.append((time.time(), self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def busy_fraction(self, start: float, end: float) -> float | None:
        inside = [util for t, util in self.samples if start <= t <= end]
        return round(sum(inside) / len(inside) / 100, 3) if inside else None

    def __enter__(self):
        if self._handle is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def wait_for_actors_to_exit(timeout_s: float = 60.0) -> None:
    """Killed actors (a finished run's encoder pool, the ceiling probes) exit asynchronously: wait for them,
    so that their memory is not counted in the next run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lingering = []
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if " ".join(proc.cmdline()).startswith(("ray::MapWorker", "ray::CeilingProbe")):
                    lingering.append(proc.pid)
        if not lingering:
            return
        time.sleep(0.5)
    log.warning("actor processes %s still alive after %.0f s: the next memory figure includes them",
                lingering, timeout_s)


def measure_ceiling(cfg: JobCfg, random_weights: bool, input_ids: np.ndarray, seconds: float, use_ray: bool) -> dict:
    """One probe per encoder actor, with its resources, all timed at once: the pool's ceiling is their sum.
    Without Ray, one probe in this process."""
    if use_ray:
        import ray

        from pipeline.run import ray_resources

        encode = ray_resources(cfg)["encode"]
        actor = {k: encode[k] for k in ("num_cpus", "num_gpus", "memory", "runtime_env") if k in encode}
        probes = [ray.remote(**actor)(CeilingProbe).remote(cfg, random_weights)
                  for _ in range(actor_range(cfg.encoder.actors)[0])]
        try:
            ray.get([p.__ray_ready__.remote() for p in probes])  # every model loaded before any timing starts
            each = ray.get([p.measure.remote(input_ids, seconds, 3) for p in probes])
        finally:
            for p in probes:
                ray.kill(p)
    else:
        each = [CeilingProbe(cfg, random_weights).measure(input_ids, seconds, 3)]
    return {"pairs_per_s": round(sum(m["pairs_per_s"] for m in each), 3),
            "per_actor_pairs_per_s": [m["pairs_per_s"] for m in each], "batches": sum(m["batches"] for m in each),
            "model_load_s": max(m["model_load_s"] for m in each), "device": each[0]["device"]}


def run_benchmark(cfg: JobCfg, pairs: int, per_shard: int, precisions: list[str], placements: list[str],
                  cache: Path, memory_check: bool, ceiling_seconds: float, use_ray: bool,
                  fidelity_photos: int) -> dict:
    from pipeline.encode import decide_random_weights

    started = time.perf_counter()
    if use_ray:
        import ray

        from pipeline.run import init_ray

        if not ray.is_initialized():
            init_ray(None, cfg.ray.num_cpus)
        cfg = resolve_actors(cfg, ray.cluster_resources())
    else:  # no cluster: this machine is all there is
        import torch

        cfg = resolve_actors(cfg, {"CPU": cfg.ray.num_cpus or os.cpu_count() or 1, "GPU": torch.cuda.device_count()})
    ray_start_s = time.perf_counter() - started
    n_shards = max(1, pairs // per_shard)
    shards = make_benchmark_shards(cache / f"shards-v2-{per_shard}", n_shards, per_shard)
    random_weights = decide_random_weights(cfg)
    tokenizer = resolve_tokenizer(cfg, random_weights)
    report = {"machine": machine(), "pairs": n_shards * per_shard, "shards": n_shards, "ray": use_ray,
              "encoder_actors": cfg.encoder.actors, "encoder_batch_size": cfg.encoder.batch_size,
              "torch_threads": cfg.encoder.torch_threads, "batches_in_flight": cfg.encoder.batches_in_flight,
              "models": {"text": cfg.model.text, "image": cfg.model.image, "random_weights": random_weights},
              "cpu": decode_rate_per_core(cfg, shards[0], tokenizer), "runs": {}}
    if not use_ray:
        from pipeline.inprocess import read_workers

        report["without_ray"] = (f"Ray is not used: read + tokenize (+ decode) in {read_workers(cfg)} worker "
                                 "processes, the encoder in the benchmark's own process")
    texts = [caption(np.random.default_rng(i)) for i in range(cfg.encoder.batch_size)]
    input_ids = tokenize(load_tokenizer(*tokenizer), texts)
    report["ray_start_s"] = round(ray_start_s, 3)

    def configured(precision: str, placement: str = "tasks") -> JobCfg:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, precision=precision),
                                   read=dataclasses.replace(cfg.read, decode_on=placement))

    for precision in precisions:
        # the ceiling is measured right before and right after the end-to-end runs, and the higher one is
        # used: on a shared machine the CPU's speed drifts, and the ratio must not flatter the pipeline
        before = measure_ceiling(configured(precision), random_weights, input_ids, ceiling_seconds, use_ray)
        runs = {}
        for placement in placements:
            with tempfile.TemporaryDirectory() as tmp:
                runs[placement] = {"end_to_end": end_to_end(configured(precision, placement), shards,
                                                            Path(tmp) / "out", use_ray, random_weights, tokenizer)}
        after = measure_ceiling(configured(precision), random_weights, input_ids, ceiling_seconds, use_ray)
        ceiling = max(before, after, key=lambda c: c["pairs_per_s"])
        for run in runs.values():
            e2e = run["end_to_end"]
            if e2e["steady_pairs_per_s"]:
                run["steady_ratio"] = round(e2e["steady_pairs_per_s"] / ceiling["pairs_per_s"], 3)
            run["whole_run_ratio"] = round(e2e["pairs"] / e2e["wall_s"] / ceiling["pairs_per_s"], 3)
        report["runs"][precision] = {"encoder_ceiling": ceiling, "ceiling_before_pairs_per_s": before["pairs_per_s"],
                                     "ceiling_after_pairs_per_s": after["pairs_per_s"], "decode_on": runs}
    if memory_check and use_ray:  # once, with the last precision: memory does not depend on it
        report["memory_scaling"] = memory_scaling(configured(precisions[-1], placements[-1]), cache, per_shard,
                                                  random_weights, tokenizer)
    # last: its two towers, loaded in this process, must not count in the runs' memory
    if fidelity_photos:
        from pipeline.fidelity import measure_fidelity

        rng = np.random.default_rng(7)
        report["fidelity"] = measure_fidelity(cfg, photo_pool(fidelity_photos, seed=7),
                                              [caption(rng) for _ in range(fidelity_photos)],
                                              "cuda" if gpu_available() else "cpu")
    return report


def memory_scaling(cfg: JobCfg, cache: Path, per_shard: int, random_weights: bool,
                   tokenizer: tuple[str, str | None]) -> dict:
    """Peak memory of the job on enough shards to give every encoder actor a batch, and on 8x as many.

    Streaming with bounded in-flight blocks keeps the two peaks close. The small run must keep every
    actor busy: on fewer shards some actors hold weights but never the activations of a batch.
    """
    actors = actor_range(cfg.encoder.actors)[1]
    small_shards = max(1, -(-actors * cfg.encoder.batch_size // per_shard))
    shards = make_benchmark_shards(cache / f"shards-v2-{per_shard}", 8 * small_shards, per_shard)

    def run(n: int) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            return end_to_end(cfg, shards[:n], Path(tmp) / "out", True, random_weights, tokenizer,
                              memory_interval_s=0.5)

    small, large = run(small_shards), run(8 * small_shards)
    return {"precision": cfg.model.precision, "decode_on": cfg.read.decode_on, "pairs_small": small["pairs"], "pairs_large": large["pairs"],
            "peak_mib_small": small["peak_memory_mib"], "peak_mib_large": large["peak_memory_mib"],
            "growth": round(large["peak_memory_mib"] / small["peak_memory_mib"] - 1, 3),
            "peak_rss_sum_mib_small": small["peak_rss_sum_mib"], "peak_rss_sum_mib_large": large["peak_rss_sum_mib"],
            "rss_sum_growth": round(large["peak_rss_sum_mib"] / small["peak_rss_sum_mib"] - 1, 3)}


def ray_version() -> str | None:
    try:
        import ray
    except ImportError:
        return None
    return ray.__version__


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def machine() -> dict:
    import platform

    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "ray": ray_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_table(report: dict) -> str:
    lines = []
    if report.get("without_ray"):
        lines.append(f"MEASURED WITHOUT RAY: {report['without_ray']}")
    if report["models"]["random_weights"]:
        lines.append("random weights of the real architectures (speed only)")
    lines.append(f"{'precision':<10}{'decode_on':<10}{'ceiling/s':>11}{'steady/s':>10}{'ratio':>7}{'whole/s':>9}"
                 f"{'whole ratio':>12}{'GPU busy':>9}{'startup s':>10}{'load s':>8}{'peak MiB':>10}{'B/pair':>8}")
    for precision, run in report["runs"].items():
        c = run["encoder_ceiling"]
        for placement, placed in run["decode_on"].items():
            e = placed["end_to_end"]
            busy = f"{e['gpu_busy_steady']:.0%}" if e.get("gpu_busy_steady") is not None else "-"
            lines.append(f"{precision:<10}{placement:<10}{c['pairs_per_s']:>11.2f}{e['steady_pairs_per_s'] or 0:>10.2f}"
                         f"{placed.get('steady_ratio', 0):>7.3f}{e['whole_run_pairs_per_s']:>9.2f}"
                         f"{placed['whole_run_ratio']:>12.3f}{busy:>9}{e['startup_s'] or 0:>10.1f}"
                         f"{c['model_load_s']:>8.1f}{e['peak_memory_mib']:>10.0f}{e['parquet_bytes_per_pair']:>8.0f}")
    cpu = report["cpu"]
    lines.append(f"CPU per core: {cpu['decode_images_per_s_per_core']} images/s decoded + resized by PIL (decode_on="
                 f"tasks), {cpu['encoder_path_on_cpu_images_per_s_per_core']} by the encoder path on CPU; mean JPEG "
                 f"{cpu['mean_jpeg_kb']} KiB; {cpu['tokenize_captions_per_s_per_core']} captions/s tokenized"
                 + (f"; Ray start {report['ray_start_s']} s" if report["ray"] else ""))
    if "gpu_decode_resize_images_per_s" in cpu:
        lines.append(f"GPU decode + resize (nvJPEG, batch {report['encoder_batch_size']}): "
                     f"{cpu['gpu_decode_resize_images_per_s']} images/s")
    if "fidelity" in report:
        f = report["fidelity"]
        lines.append(f"fidelity, decode_on=encoder vs the exact path, {f['photos']} photos on {f['device']} "
                     f"({f['decoder']}; {f['weights']}): pixels mean {f['pixel_levels_mean']} / p99 "
                     f"{f['pixel_levels_p99']:g} / max {f['pixel_levels_max']} levels; image embedding max "
                     f"|diff| {f['embedding_max_component_diff']:.2e} per component; |delta similarity| p50 "
                     f"{f['similarity_abs_diff_p50']:.1e}, p99 {f['similarity_abs_diff_p99']:.1e}, max "
                     f"{f['similarity_abs_diff_max']:.1e}")
    if "memory_scaling" in report:
        m = report["memory_scaling"]
        lines.append(f"memory ({m['precision']}, decode_on={m['decode_on']}): {m['pairs_small']} -> {m['pairs_large']} "
                     f"pairs: total PSS sampled {m['peak_mib_small']} -> {m['peak_mib_large']} MiB ({m['growth']:+.1%}); "
                     f"sum of per-process peak RSS {m['peak_rss_sum_mib_small']} -> {m['peak_rss_sum_mib_large']} MiB "
                     f"({m['rss_sum_growth']:+.1%})")
    return "\n".join(lines)


def tiny_checkpoints(folder: Path) -> tuple[Path, Path]:
    """Tiny random towers of the real layouts, for the CI smoke run only (never for reported figures)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, CLIPConfig, CLIPModel

    from pipeline.preprocess import BUNDLED_VOCAB_DIR

    text, image = folder / "tiny-text", folder / "tiny-image"
    if not (text / "config.json").exists():
        BertForSequenceClassification(BertConfig(vocab_size=21128, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=64,
                                                 num_labels=512)).save_pretrained(text)
        BertTokenizer.from_pretrained(str(BUNDLED_VOCAB_DIR)).save_pretrained(text)
    if not (image / "config.json").exists():
        CLIPModel(CLIPConfig(text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64),
                             vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, image_size=224, patch_size=32),
                             projection_dim=512)).save_pretrained(image)
    return text, image

