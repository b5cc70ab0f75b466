"""Decode and resize images on the encoder's own device (read.decode_on=encoder): batched nvJPEG on a GPU.

The read tasks ship the bytes of each JPEG that a device decoder sees exactly as PIL does (a complete baseline
JPEG, RGB or grey, upright, within the pixel cap and the exact aspect range); in the encoder actor they are
decoded in one batch on the device, then resized shortest edge to 224 and center-cropped for the whole batch
at once with PIL's own bicubic arithmetic (resize.py): the same bytes as the exact path for the same decoded
pixels. Every other image (PNG, WebP, GIF, progressive or CMYK JPEG, EXIF-rotated, truncated, garbage) is
decoded by the exact path (image.decode_image) in the read tasks, which ship its pixels, or its error row
with the same reason as read.decode_on=tasks; the actor copies those pixels to the device as one block. The
actor decodes on its CPU only what the device decoder refused, or when its caller decoded nothing before.

Decoders: torchvision.io.decode_jpeg on CUDA (batched nvJPEG; torchvision is in most CUDA images and uses
torch's own CUDA context and caching allocator, where nvImageCodec would be one more CUDA library to match to
the driver; torchvision 0.29 deprecates its decoders for TorchCodec: the call is in DeviceDecoder._decode
alone). On CPU, PIL stands in for nvJPEG: the same code, decoder aside, which is how CI runs this path.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.config import ReadCfg
from pipeline.embed.image import MAX_EXACT_ASPECT, SampleError, decode_image, resize_geometry
from pipeline.embed.resize import resize_center_crop_batch
from pipeline.embed.transfer import host_to_device

EXIF_ORIENTATION = 0x0112
JPEG_START = b"\xff\xd8"


def device_decodable(payload: bytes | None, size: int, max_pixels: int) -> int:
    """The image's width x height if the device path gives it what the exact path would (up to the decoder),
    else 0.

    Only the header is parsed, and the compressed data scanned for markers (scan_is_clean). A JPEG without its
    end marker is left to PIL, which reports the truncation (a GPU decoder may return the part it could read).
    """
    if not payload or payload[:2] != JPEG_START:
        return 0
    try:
        image = Image.open(io.BytesIO(payload))
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - anything odd goes to the exact path, which names the problem
        return 0
    width, height = image.size
    if (image.format != "JPEG" or image.mode not in ("RGB", "L") or orientation != 1
            or image.info.get("progressive") or image.info.get("progression")
            or width < 1 or height < 1 or width * height > max_pixels):
        return 0
    new_w, new_h, _, _ = resize_geometry(width, height, size)
    if max(new_w, new_h) > MAX_EXACT_ASPECT * size or not scan_is_clean(payload):
        return 0
    return width * height


def scan_is_clean(payload: bytes) -> bool:
    """Whether a baseline JPEG's compressed data holds no marker but restart markers, and ends with its end
    marker (zero padding after it allowed).

    Corruption in the middle of a JPEG is where libjpeg and a GPU decoder may part: libjpeg (PIL) fails with
    "broken data stream" on a marker it finds inside the compressed data, a Huffman table it cannot build or
    a bad scan header, where nvJPEG may decode something. Such an image goes to the exact path, which gives
    its verdict. Measured (pipeline/bench/fidelity.corrupted_routing(4000, seed=0)) on 4,000 JPEGs with a
    run of bytes overwritten or cut out after their first 20 bytes: PIL fails on 724, and device_decodable
    keeps all 724 from the device (722 by this scan, 2 by their header); it keeps 127 of the 3,276 that PIL
    decodes too (3.9%: they take the exact path, which costs only speed).
    """
    data = np.frombuffer(payload, np.uint8)
    at = 2
    while True:  # the header's segments, up to the start of scan (SOS)
        while at < len(data) and data[at] == 0xFF and at + 1 < len(data) and data[at + 1] == 0xFF:
            at += 1  # fill bytes
        if at + 4 > len(data) or data[at] != 0xFF:
            return False
        marker, length = data[at + 1], int(data[at + 2]) << 8 | int(data[at + 3])
        segment = data[at + 4 : at + 2 + length]
        if marker == 0xC4 and not huffman_tables_valid(segment):
            return False
        if marker == 0xDA and not (len(segment) >= 1 and 1 <= segment[0] <= 4 and length == 6 + 2 * segment[0]
                                   and tuple(segment[-3:]) == (0, 63, 0)):  # one baseline scan's header
            return False
        at += 2 + length
        if marker == 0xDA:
            break
    scan = data[at:]
    escapes = np.flatnonzero(scan[:-1] == 0xFF)
    follows = scan[escapes + 1]
    # in the compressed data 0xFF is followed by 0 (a stuffed byte), a restart marker, or 0xFF (fill)
    markers = escapes[~((follows == 0) | ((follows >= 0xD0) & (follows <= 0xD7)) | (follows == 0xFF))]
    if len(markers) == 0:
        return False  # no end marker: truncated
    end = markers[0]
    return scan[end + 1] == 0xD9 and not scan[end + 2:].any()


def chunks_under(areas: list[int], budget: int) -> list[list[int]]:
    """The indices of the images with an area (> 0), in order, in runs whose areas sum to at most `budget`
    (an image over it alone)."""
    chunks, total = [], budget + 1
    for i, area in enumerate(areas):
        if not area:
            continue
        if total + area > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += area
    return chunks


def huffman_tables_valid(segment: np.ndarray) -> bool:
    """libjpeg's checks of the Huffman tables of one DHT segment (jdhuff.c, jpeg_make_d_derived_tbl): where
    they fail, libjpeg stops with "bogus Huffman table" and nvJPEG may not."""
    at = 0
    while at < len(segment):
        if at + 17 > len(segment):
            return False
        table_class, counts = segment[at] >> 4, segment[at + 1 : at + 17].astype(int)
        symbols = segment[at + 17 : at + 17 + counts.sum()]
        if counts.sum() > 256 or len(symbols) < counts.sum() or table_class > 1:
            return False
        code = 0
        for length, count in enumerate(counts, start=1):  # canonical codes: each length must leave room
            code += count
            if count and code >= 1 << length:
                return False
            code <<= 1
        if table_class == 0 and (symbols > 15).any():  # a DC table's symbols are bit counts, 0..15
            return False
        at += 17 + counts.sum()
    return True


def byte_views(payloads) -> list:
    """Each image's bytes as a 1-D uint8 tensor (None for a null): for a binary Arrow array, views of its one
    data buffer (no copy per image); for a list of bytes, one copy each."""
    import torch

    if isinstance(payloads, pa.ChunkedArray):
        payloads = payloads.combine_chunks()
    if not isinstance(payloads, pa.Array):
        return [None if p is None else torch.frombuffer(bytearray(p), dtype=torch.uint8) if p else
                torch.zeros(0, dtype=torch.uint8) for p in payloads]
    offsets = np.frombuffer(payloads.buffers()[1], np.int32)[payloads.offset : payloads.offset + len(payloads) + 1]
    flat = read_only_tensor(payloads.buffers()[2])
    valid = payloads.is_valid().to_pylist()
    return [flat[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(payloads))]


def read_only_tensor(buffer):
    """A 1-D uint8 tensor viewing an Arrow buffer in place (empty for none). Nothing writes to it: torch's
    warning that the buffer is not writable is silenced here."""
    import warnings

    import torch

    if buffer is None or not buffer.size:
        return torch.zeros(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(buffer, dtype=torch.uint8)


def as_bytes(payload) -> bytes | None:
    return None if payload is None else payload.numpy().tobytes()


def surface_device_failure(exc: Exception) -> None:
    """Only a decoder's refusal of an image falls back to the exact path: out of memory and other CUDA errors
    are the device's, and surface as themselves (hiding them would move a whole run onto the CPU path)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or "CUDA error" in str(exc) or "CUDA out of memory" in str(exc):
        raise exc


class DeviceDecoder:
    """Bytes of a batch's images in; N x 3 x size x size uint8 on the device and an error (or None) per image out."""

    def __init__(self, device, size: int, max_pixels: int, chunk_pixels: int = ReadCfg.device_decode_pixels,
                 resize: str = ReadCfg.device_resize):
        """chunk_pixels: the most source pixels (width x height, summed) decoded at once; a batch of larger
        images is decoded and resized in chunks under it, so that their full-size pixels never all sit in
        the device's memory at once (an image larger than it alone). resize: read.device_resize."""
        self.device, self.size, self.max_pixels, self.chunk_pixels = device, size, max_pixels, chunk_pixels
        self.resize = resize
        if resize == "triton":
            try:
                import triton  # noqa: F401
            except ImportError as exc:
                raise RuntimeError("read.device_resize=triton needs triton (it comes with CUDA builds of torch on "
                                   "Linux), or set read.device_resize=torch") from exc
        if device.type == "cuda":
            try:
                from torchvision.io import decode_jpeg  # noqa: F401
            except ImportError as exc:
                raise RuntimeError("read.decode_on=encoder on a GPU needs torchvision's nvJPEG decoder: "
                                   "pip install -e '.[gpu]' with your CUDA torch, or set read.decode_on=tasks") from exc
            self.backend = "nvjpeg"
        else:
            self.backend = "pil"  # stands in for nvJPEG where there is no GPU: CI and CPU-only nodes
        # images decoded on the device, decoded by the read tasks (pixels given), decoded here on the CPU;
        # batched decode calls
        self.on_device = self.from_tasks = self.on_cpu = self.decode_calls = 0

    def __call__(self, payloads, areas: list[int] | None = None, pixels=None):
        """`payloads`: the images' bytes, a list or a binary Arrow array (its buffer is then read in place: no
        copy per image). `areas`: device_decodable for each image (0: not for the device) where the caller
        has it already (the job's read tasks check the headers, off the encoder's cores). `pixels`: an Arrow
        array of size x size x 3 uint8 bytes (or null) per image, the images the read tasks decoded by the
        exact path: copied to the device as one block, never decoded here."""
        import torch

        payloads = byte_views(payloads)
        if areas is None:
            areas = [device_decodable(as_bytes(p), self.size, self.max_pixels) for p in payloads]
        images = torch.zeros((len(payloads), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        done = set()
        for chunk in chunks_under(areas, self.chunk_pixels):  # one batched decode and resize per chunk
            decoded = [(i, image) for i, image in zip(chunk, self.decode_jpegs([payloads[i] for i in chunk]))
                       if image is not None]
            if decoded:  # indexed by a device tensor (transfer.py: a list would make the host wait)
                at = host_to_device([i for i, _ in decoded], torch.int64, self.device)
                images[at] = resize_center_crop_batch([image for _, image in decoded], self.size, kernel=self.resize)
            done |= {i for i, _ in decoded}
        self.on_device += len(done)
        if isinstance(pixels, pa.ChunkedArray):
            pixels = pixels.combine_chunks()
        ready = []
        if pixels is not None and pixels.null_count < len(pixels):
            ready = [i for i, valid in enumerate(pixels.is_valid().to_pylist()) if valid and i not in done]
            block = read_only_tensor(pixels.take(ready).buffers()[1])  # one host copy (the take) for all of them
            block = block[: len(ready) * self.size * self.size * 3].view(len(ready), self.size, self.size, 3)
            images[host_to_device(ready, torch.int64, self.device)] = host_to_device(
                block, torch.uint8, self.device).permute(0, 3, 1, 2)
            done |= set(ready)
        errors: list[str | None] = [None] * len(payloads)
        exact = [i for i in range(len(payloads)) if i not in done]
        for i in exact:  # a decoder's refusal, or a caller that decoded nothing beforehand
            try:
                exact_pixels = decode_image(as_bytes(payloads[i]), self.size, self.max_pixels)
            except SampleError as exc:
                errors[i] = str(exc)
                continue
            images[i] = host_to_device(exact_pixels, None, self.device).permute(2, 0, 1)
        self.from_tasks += len(ready)
        self.on_cpu += len(exact)
        return images, errors

    def decode_jpegs(self, payloads: list) -> list:
        """3 x H x W uint8 tensors on the device; None where the decoder refused an image."""
        if not payloads:
            return []
        try:
            return self._decode(payloads)
        except Exception as exc:  # noqa: BLE001 - a batched decode fails whole on one bad image: find it
            surface_device_failure(exc)
            decoded = []
            for payload in payloads:
                try:
                    decoded.append(self._decode([payload])[0])
                except Exception as exc:  # noqa: BLE001 - the exact CPU path decides what is wrong with it
                    surface_device_failure(exc)
                    decoded.append(None)
            return decoded

    def _decode(self, payloads: list) -> list:
        import torch

        self.decode_calls += 1
        if self.backend == "nvjpeg":
            from torchvision.io import ImageReadMode, decode_jpeg

            # thread-safe on CUDA (torchvision's docs), so two batches in flight decode side by side; the
            # payloads are 1-D uint8 views of the batch's Arrow buffer
            return list(decode_jpeg(payloads, mode=ImageReadMode.RGB, device=self.device))
        return [torch.from_numpy(np.array(Image.open(io.BytesIO(as_bytes(p))).convert("RGB"))).permute(2, 0, 1)
                for p in payloads]
