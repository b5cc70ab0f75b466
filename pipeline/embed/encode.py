"""The two Taiyi-CLIP towers in a Ray actor: uint8 pixels and token ids in, L2-normalised embeddings out."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import JobCfg
from pipeline.embed.model import load_towers
from pipeline.embed.transfer import host_to_device
from pipeline.io.schema import EMBEDDING_DIM, STATUS_ERROR, STATUS_OK

log = logging.getLogger(__name__)

# OpenAI CLIP normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def cpu_has_bf16() -> bool:
    """Whether this (Linux) CPU has bf16 instructions (x86 AVX512-BF16 or AMX, Arm BF16); True where it
    cannot tell."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


# glibc mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
HEAP_LIMIT = 2**30  # 1 GiB: above any one activation of these towers

# The same, for a CPU encoder actor's process from its start (ray_resources): glibc binds each thread to an
# arena at its first allocation, and Ray Data runs batches on a thread made after Encoder.__init__, which may
# then share an arena of Ray's own threads; an arena other than the main one grows in heaps of 64 MiB at
# most, too small for these blocks, which are then mapped afresh after all (measured: 130-200k page faults
# per batch instead of 18k). One arena: the actor's torch runs on one thread anyway.
KEEP_FREED_MEMORY_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(HEAP_LIMIT),
                         "MALLOC_TRIM_THRESHOLD_": str(HEAP_LIMIT)}


def keep_freed_memory() -> bool:
    """Keep freed CPU tensors in this process's heap for reuse, instead of handing them back to the kernel.

    glibc serves every block over its mmap threshold (32 MiB at most) with a fresh mapping and unmaps it
    on free, and trims the heap's top: at batch 64 BERT's MLP activations (60 MB) and ViT's (39 MB) are
    then mapped, zeroed page by page and unmapped in every layer. Measured on a 2-core EPYC VM, one thread:
    5M page faults and 12% of the time in the kernel per 3 batches; with both thresholds raised, 0.1M and
    0.2%, and 12% more pairs/s (BENCHMARKS.md). The cost: the process keeps its peak working set (one
    batch's activations) resident: 1.7 instead of 1.2 GiB per actor at batch 64, flat over 45 batches.
    Threads that already hold another arena keep it (see KEEP_FREED_MEMORY_ENV). No-op outside glibc
    (macOS, musl). Returns whether it took effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, ctypes.c_int(value)) for param, value in (
        (M_MMAP_THRESHOLD, HEAP_LIMIT), (M_TRIM_THRESHOLD, HEAP_LIMIT), (M_ARENA_MAX, 1)))


def cast_for_autocast(model, dtype) -> None:
    """Cast once the weights that autocast would cast on every forward pass: those of the linear and
    convolution layers, which autocast runs in `dtype`. Their results are the same (autocast's cast of a
    weight already in `dtype` is a no-op), without a cast of every weight per batch and with half the
    memory. Embeddings and layer norms keep float32, as autocast runs them. (dtype float32 undoes it.)"""
    import torch

    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.to(dtype)


# One capture at a time in a process: torch.cuda.graph documents that only one capture may be underway (it
# captures every graph on one shared stream of its own), and it starts with a device-wide synchronize, which
# invalidates another thread's capture in progress whatever its capture mode. Each batch in flight captures on
# its first batch, so without this lock the threads' captures would start together. Other threads' eager work
# (decode, copies, replays) goes on meanwhile: that is what capture_error_mode="thread_local" allows.
CAPTURE_LOCK = threading.Lock()


class GraphedTower:
    """A tower captured as a CUDA graph at the first input's shape (always encoder.batch_size: at_fixed_shape),
    then replayed: the input copied into the graph's own buffer, one launch, the output copied out. Where the
    capture fails (a model whose forward syncs with the host), the tower runs eagerly, with a warning."""

    def __init__(self, forward, name: str):
        self.forward, self.name, self.graph, self.failed = forward, name, None, False

    def __call__(self, rows):
        import torch

        if self.failed:
            return self.forward(rows)
        if self.graph is None:
            with CAPTURE_LOCK:
                try:
                    self.capture(rows)
                except Exception as exc:  # noqa: BLE001 - eager still gives the same embeddings
                    log.warning("CUDA graph capture of the %s tower failed, running it eagerly: %s", self.name, exc)
                    self.failed = True
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()  # a failed capture's error, if any, surfaces here and not later
            if self.failed:
                return self.forward(rows)
        self.static_input.copy_(rows)
        self.graph.replay()
        return self.static_output.clone()

    def capture(self, rows) -> None:
        import torch

        self.static_input = rows.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS handles, allocator, kernel choice
            for _ in range(2):
                self.forward(self.static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another batch in flight may allocate on its own thread meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_output = self.forward(self.static_input)
        self.graph = graph


def running_node() -> str:
    """The Ray node this process runs on ("local" outside Ray: the benchmark's run without Ray, also where
    Ray is not installed, as on a lone GPU machine)."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; importing it here would only cost time
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"


class Encoder:
    """Ray Data actor: loads the towers once, then embeds batches of prepared rows."""

    def __init__(self, cfg: JobCfg, random_weights: bool = False, texts: bool = True):
        """texts=False: image embeddings only (the evaluation job embeds its texts apart); text embeddings
        and similarity are then zeros."""
        import torch

        torch.set_num_threads(cfg.encoder.torch_threads)
        use_cuda = cfg.encoder.device == "cuda" or (cfg.encoder.device == "auto" and cfg.encoder.num_gpus > 0)
        if use_cuda and not torch.cuda.is_available():
            raise RuntimeError("encoder.num_gpus > 0 but this actor sees no CUDA device (encoder.device=auto)")
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if self.device.type == "cpu" and not keep_freed_memory():
            log.info("not glibc: freed activations go back to the kernel (slower on CPU, see keep_freed_memory)")
        precision = cfg.model.precision
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            log.warning("model.precision=bf16 on a CPU without bf16 instructions (AVX512-BF16 / AMX): torch "
                        "emulates it, many times slower than fp32; use fp32 here")
        self.embedding_dtype = np.float16 if cfg.write.embedding_dtype == "float16" else np.float32
        self.texts = texts
        self.text_model, self.image_model = (m.to(self.device) for m in load_towers(cfg, random_weights))
        self.batch_size = cfg.encoder.batch_size
        self.cuda_graphs = cfg.encoder.cuda_graphs and self.device.type == "cuda"
        self.cast_weights(once=True)
        self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        self.pixel_bytes = cfg.read.image_size ** 2 * 3
        self.image_size = cfg.read.image_size
        self.decoder = None
        if cfg.read.decode_on == "encoder":
            from pipeline.embed.device_decode import DeviceDecoder

            self.decoder = DeviceDecoder(self.device, cfg.read.image_size, cfg.read.max_image_pixels,
                                         cfg.read.device_decode_pixels, cfg.read.device_resize)
        # each batch in flight (encoder.batches_in_flight) has its own stream and CUDA graphs
        self._thread = threading.local()
        # "{node}:{actor}": tells this actor's batches apart in the driver's steady-state rate, and says in the run
        # summary which node embedded how many pairs
        self.name = f"{running_node()}:{uuid.uuid4().hex[:12]}"
        log.info("encoder on %s, precision %s, %d torch threads, images decoded %s", self.device, precision,
                 torch.get_num_threads(), f"here ({self.decoder.backend})" if self.decoder else "by the read tasks")

    def _autocast(self):
        import torch

        # no cache of casts: the weights are cast once (cast_weights), and a CUDA graph capture forbids it
        return (torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)
                if self.autocast_dtype else contextlib.nullcontext())

    def cast_weights(self, once: bool) -> None:
        """once: the linear and convolution weights in the autocast dtype (cast_for_autocast); else in float32,
        cast by autocast on every batch (the benchmark's "before", to measure what casting once gains)."""
        if self.autocast_dtype is None:
            return
        import torch

        for tower in (self.text_model, self.image_model):
            cast_for_autocast(tower, self.autocast_dtype if once else torch.float32)
        self._thread = threading.local()  # captured graphs point at the old weights: drop them (and the streams)

    def _stream(self):
        """This thread's CUDA stream: a batch's copies, decode and forward passes queue behind each other, not
        behind another batch's. No-op on CPU."""
        import torch

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if not hasattr(self._thread, "stream"):
            self._thread.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._thread.stream)

    def to_device(self, array: np.ndarray):
        """A host array on the device; on CUDA through pinned memory, so the copy does not hold up the host."""
        return host_to_device(np.ascontiguousarray(array), None, self.device)

    def embed_images(self, images):
        """L2-normalised float32 image features (a torch tensor on the device) for uint8 NHWC pixels (numpy)
        or uint8 N x 3 x H x W images already on the device."""
        import torch

        if isinstance(images, np.ndarray):
            images = self.to_device(images).permute(0, 3, 1, 2)
        features = self.at_fixed_shape(self.tower("image", self.image_forward), images)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def image_forward(self, pixels):
        """Image tower on uint8 N x 3 x H x W pixels on the device: CLIP normalisation, then the tower."""
        import torch

        with torch.inference_mode(), self._autocast():
            pixels = (pixels.float() / 255.0 - self.mean) / self.std
            return self.image_model(pixel_values=pixels).image_embeds

    def text_forward(self, ids):
        import torch

        with torch.inference_mode(), self._autocast():
            return self.text_model(input_ids=ids).logits

    def tower(self, name: str, forward):
        """`forward`, or with encoder.cuda_graphs this thread's CUDA graph of it (captured on first use)."""
        if not self.cuda_graphs:
            return forward
        graphs = self._thread.__dict__.setdefault("graphs", {})
        if name not in graphs:
            graphs[name] = GraphedTower(forward, name)
        return graphs[name]

    def embed_texts(self, input_ids: np.ndarray):
        """L2-normalised float32 text features (the 512 logits) for 77-token id rows, no attention mask."""
        import torch

        features = self.at_fixed_shape(self.tower("text", self.text_forward), self.to_device(input_ids.astype(np.int64)))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def at_fixed_shape(self, tower, rows):
        """tower(rows) run on exactly encoder.batch_size rows at a time: a partial batch is padded with zeros
        and its padding dropped after. The towers then see one shape only (the same kernels every batch; what
        CUDA graphs and torch.compile need), and a larger input is embedded batch by batch."""
        import torch

        n, size = len(rows), self.batch_size
        outputs = []
        for begin in range(0, max(n, 1), size):
            part = rows[begin : begin + size]
            if len(part) < size:
                part = torch.cat([part, part.new_zeros((size - len(part), *part.shape[1:]))])
            outputs.append(tower(part)[: min(size, n - begin)])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def embed(self, images, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 (image embeddings, text embeddings, similarity) for images (see embed_images) and token ids."""
        import torch

        image_features, text_features = self.embed_images(images), self.embed_texts(input_ids)
        similarity = (image_features * text_features).sum(dim=-1)  # cosine, in float32, on the device
        # one packed copy to the host for the three of them
        packed = torch.cat([image_features, text_features, similarity[:, None]], dim=1).cpu().numpy()
        return packed[:, :EMBEDDING_DIM], packed[:, EMBEDDING_DIM:-1], packed[:, -1]

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self._stream():
            return self.embed_batch(batch)

    def embed_batch(self, batch: pa.Table) -> pa.Table:
        import torch

        started = time.time()
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        positions = batch.column("position").to_numpy()
        todo = np.flatnonzero((positions >= 0) & np.array([e is None for e in errors], dtype=bool))
        image_emb = np.zeros((n, EMBEDDING_DIM), np.float32)
        text_emb = np.zeros((n, EMBEDDING_DIM), np.float32)
        similarity = np.zeros(n, np.float32)
        if len(todo):
            ids_col = batch.column("input_ids").combine_chunks()
            input_ids = ids_col.flatten().to_numpy().reshape(n, -1)
            if self.decoder is not None:
                rows = pa.array(todo)
                images, decode_errors = self.decoder(batch.column("image").take(rows),
                                                     batch.column("device_area").take(rows).to_pylist(),
                                                     batch.column("pixels").take(rows))
                for i, error in zip(todo, decode_errors):
                    errors[i] = error
                decoded = np.flatnonzero([e is None for e in decode_errors])
                if len(decoded) < len(todo):
                    images, todo = images[host_to_device(decoded, torch.int64, images.device)], todo[decoded]
            else:
                images = self.pixels(batch)[todo]
            if len(todo) and self.texts:
                image_emb[todo], text_emb[todo], similarity[todo] = self.embed(images, input_ids[todo])
            elif len(todo):
                image_emb[todo] = self.embed_images(images).cpu().numpy()
        ok = np.zeros(n, bool)
        ok[todo] = True
        # a NaN or inf (an overflow in fp16, a broken checkpoint) is never an ok row: it would poison every
        # similarity rule and dedup search that reads it
        for i in np.flatnonzero(ok & ~(np.isfinite(image_emb).all(1) & np.isfinite(text_emb).all(1)
                                       & np.isfinite(similarity))):
            towers = [name for name, emb in (("image", image_emb), ("text", text_emb)) if not np.isfinite(emb[i]).all()]
            errors[i] = f"non_finite_embedding: NaN or inf from the {' and '.join(towers) or 'similarity'} tower"
            ok[i] = False
        if self.decoder is not None or not ok[todo].all():
            batch = batch.set_column(batch.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        table = embedded_table(batch, ok, image_emb.astype(self.embedding_dtype), text_emb.astype(self.embedding_dtype),
                               similarity)
        # which actor ran this batch, and when: the driver's steady-state rate is built from these
        return (table.append_column("encoder", pa.array([self.name] * n, pa.string()))
                .append_column("encode_started", pa.array(np.full(n, started), pa.float64()))
                .append_column("encoded_at", pa.array(np.full(n, time.time()), pa.float64())))


    def pixels(self, batch: pa.Table) -> np.ndarray:
        """The batch's decoded pixels (decode_on=tasks) as an N x H x W x 3 uint8 view, without a copy."""
        n = batch.num_rows
        pixels_col = batch.column("pixels").combine_chunks()
        raw = np.frombuffer(pixels_col.buffers()[1], np.uint8, count=(pixels_col.offset + n) * self.pixel_bytes)
        return raw[pixels_col.offset * self.pixel_bytes:].reshape(n, self.image_size, self.image_size, 3)


def embedded_table(batch: pa.Table, ok: np.ndarray, image_emb: np.ndarray, text_emb: np.ndarray,
                   similarity: np.ndarray) -> pa.Table:
    """The batch with images and token ids replaced by status, embeddings (null unless ok) and similarity."""
    value_type = pa.from_numpy_dtype(image_emb.dtype)
    invalid = pa.array(~ok)

    def vectors(emb: np.ndarray) -> pa.Array:
        values = pa.array(emb.reshape(-1), value_type)
        return pa.FixedSizeListArray.from_arrays(values, EMBEDDING_DIM, mask=invalid)

    positions = batch.column("position").to_numpy()
    status = np.where(ok, STATUS_OK, STATUS_ERROR).astype(object)
    status[positions < 0] = None  # marker rows are not samples
    inputs = [name for name in ("pixels", "image", "device_area", "input_ids") if name in batch.column_names]
    return batch.drop_columns(inputs).append_column(
        "status", pa.array(status, pa.string())).append_column(
        "image_embedding", vectors(image_emb)).append_column(
        "text_embedding", vectors(text_emb)).append_column(
        "similarity", pa.array(np.where(ok, similarity, np.nan).astype(np.float32), pa.float32(),
                               mask=~ok))
