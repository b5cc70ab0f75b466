"""How far read.decode_on=encoder is from the exact path, measured on photos: pixels, and embeddings through the
real architectures (ViT-B/32 + BERT-base layouts with random default-init weights: labelled as such)."""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.config import JobCfg, ReadCfg
from pipeline.embed.image import SampleError, decode_image


def exact_pixels(payloads: list[bytes], size: int, max_pixels: int) -> list[np.ndarray | None]:
    pixels = []
    for payload in payloads:
        try:
            pixels.append(decode_image(payload, size, max_pixels))
        except SampleError:
            pixels.append(None)
    return pixels


def measure_fidelity(cfg: JobCfg, photos: list[bytes], captions: list[str], device: str,
                     lower_precision: str | None = None) -> dict:
    """Exact path (PIL, CPU) against the device path (DeviceDecoder on `device`), image by image, through the
    towers at fp32; with lower_precision (fp16 on a GPU), also the towers at it against fp32 on the exact pixels."""
    import torch

    from pipeline.embed.device_decode import DeviceDecoder
    from pipeline.embed.encode import Encoder
    from pipeline.embed.preprocess import load_tokenizer, resolve_tokenizer, tokenize

    size, max_pixels = cfg.read.image_size, cfg.read.max_image_pixels
    fp32 = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, precision="fp32", random_weights=True),
        encoder=dataclasses.replace(cfg.encoder, device="cuda" if device == "cuda" else "cpu",
                                    num_gpus=1 if device == "cuda" else 0))
    torch.manual_seed(0)
    encoder = Encoder(fp32, random_weights=True)
    decoder = DeviceDecoder(encoder.device, size, max_pixels)
    reference = exact_pixels(photos, size, max_pixels)
    keep = [i for i, p in enumerate(reference) if p is not None]
    exact = np.stack([reference[i] for i in keep])
    images, errors = decoder([photos[i] for i in keep])
    if any(errors):  # the exact path decoded every one of them: so must the device path
        raise RuntimeError(f"decode_on=encoder failed on images the exact path decodes: {errors}")
    on_device = images.permute(0, 2, 3, 1).cpu().numpy()
    levels = np.abs(on_device.astype(np.int16) - exact.astype(np.int16))

    image_exact = encoder.embed_images(exact)
    image_device = encoder.embed_images(images)
    input_ids = tokenize(load_tokenizer(*resolve_tokenizer(fp32, True)), [captions[i] for i in keep])
    text = encoder.embed_texts(input_ids)
    delta = (image_device - image_exact).abs().cpu().numpy()
    similarity_exact = (image_exact * text).sum(-1).cpu().numpy()
    similarity_device = (image_device * text).sum(-1).cpu().numpy()
    figures = {
        "photos": len(keep), "device": str(encoder.device), "decoder": decoder.backend,
        "took_device_path": decoder.on_device, "took_exact_cpu_path": decoder.on_cpu,
        "weights": "random (default init) of the real architectures",
        "pixel_levels_mean": round(float(levels.mean()), 4),
        "pixel_levels_p99": float(np.percentile(levels, 99)),
        "pixel_levels_max": int(levels.max()),
        "embedding_max_component_diff": float(delta.max()),
        **similarity_deviation(similarity_exact, similarity_device),
    }
    if lower_precision:
        lower = Encoder(dataclasses.replace(fp32, model=dataclasses.replace(fp32.model, precision=lower_precision)),
                        random_weights=True)
        image_lower, text_lower = lower.embed_images(exact), lower.embed_texts(input_ids)
        figures["towers_vs_fp32"] = {
            "precision": lower_precision,
            "image_embedding_max_component_diff": float((image_lower - image_exact).abs().max()),
            "text_embedding_max_component_diff": float((text_lower - text).abs().max()),
            **similarity_deviation(similarity_exact, (image_lower * text_lower).sum(-1).cpu().numpy())}
    return figures


def similarity_deviation(reference: np.ndarray, other: np.ndarray) -> dict:
    """|delta similarity| p50 / p99 / max, and the share of pairs a min_similarity rule at 0.2 / 0.25 / 0.3 keeps
    on one side and drops on the other."""
    delta = np.abs(other - reference)
    return {"similarity_abs_diff_p50": float(np.percentile(delta, 50)),
            "similarity_abs_diff_p99": float(np.percentile(delta, 99)),
            "similarity_abs_diff_max": float(delta.max()),
            "decided_differently": {str(t): float(np.mean((reference >= t) != (other >= t))) for t in (0.2, 0.25, 0.3)}}


def corrupted_routing(count: int, seed: int, size: int = ReadCfg.image_size,
                      max_pixels: int = ReadCfg.max_image_pixels) -> dict:
    """JPEGs corrupted after their first bytes (photos.corrupted_jpegs): of those the exact path fails on, how
    many the read tasks keep from the device decoder (all must be: a GPU decoder may decode what libjpeg
    rejects); of those it decodes, how many are kept from it too (they only cost speed)."""
    from pipeline.bench.photos import corrupted_jpegs
    from pipeline.embed.device_decode import device_decodable

    failed = failed_routed = decoded = decoded_routed = 0
    for payload in corrupted_jpegs(count, seed):
        exact_fails = exact_pixels([payload], size, max_pixels)[0] is None
        to_exact = not device_decodable(payload, size, max_pixels)
        failed, failed_routed = failed + exact_fails, failed_routed + (exact_fails and to_exact)
        decoded, decoded_routed = decoded + (not exact_fails), decoded_routed + (not exact_fails and to_exact)
    return {"jpegs": count, "exact_path_fails": failed, "of_those_kept_from_the_device": failed_routed,
            "exact_path_decodes": decoded, "of_those_kept_from_the_device_too": decoded_routed}
