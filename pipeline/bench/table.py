"""The benchmarks' figures: the embed benchmark's table as it prints it, and each benchmark's JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def figure(value, width: int, spec: str) -> str:
    """A measured figure, or n/a where the run did not measure it (never a made-up 0.00)."""
    return f"{'n/a' if value is None else format(value, spec):>{width}}"


def format_table(report: dict) -> str:
    lines = []
    if report.get("without_ray"):
        lines.append(f"MEASURED WITHOUT RAY: {report['without_ray']}")
    checks = report.get("gpu_checks")
    if checks is not None:
        failed = {name: result for name, result in checks.items() if result not in ("passed",) and name != "skipped"}
        lines.append("GPU checks (pipeline/bench/gpu_checks.py): " + (
            f"skipped: {checks['skipped']}" if "skipped" in checks else
            f"{len(checks) - len(failed)} of {len(checks)} passed"
            + "".join(f"\nGPU CHECK FAILED, {name}: {result}" for name, result in failed.items())))
    if report["models"]["random_weights"]:
        lines.append("random weights of the real architectures (speed only)")
    lines.append(f"{'precision':<10}{'decode_on':<10}{'ceiling/s':>11}{'steady/s':>10}{'ratio':>7}{'whole/s':>9}"
                 f"{'whole ratio':>12}{'GPU busy':>9}{'startup s':>10}{'load s':>8}{'peak MiB':>10}{'B/pair':>8}")
    for precision, run in report["runs"].items():
        c = run["encoder_ceiling"]
        for placement, placed in run["decode_on"].items():
            e = placed["end_to_end"]
            busy = f"{e['gpu_busy_steady']:.0%}" if e.get("gpu_busy_steady") is not None else "n/a"
            lines.append(f"{precision:<10}{placement:<10}{c['pairs_per_s']:>11.2f}"
                         f"{figure(e['steady_pairs_per_s'], 10, '.2f')}{figure(placed.get('steady_ratio'), 7, '.3f')}"
                         f"{e['whole_run_pairs_per_s']:>9.2f}"
                         f"{placed['whole_run_ratio']:>12.3f}{busy:>9}{figure(e['startup_s'], 10, '.1f')}"
                         f"{c['model_load_s']:>8.1f}{e['peak_memory_mib']:>10.0f}{e['parquet_bytes_per_pair']:>8.0f}")
    for precision, run in report["runs"].items():
        if "ceiling_variants" in run:
            v = run["ceiling_variants"]
            lines.append(f"{precision} ceiling as configured {v['as_configured']:.2f}/s; " + "; ".join(
                f"{name.replace('_', ' ')} {figures['pairs_per_s']:.2f}/s"
                + (f" (capture FAILED for {', '.join(figures['cuda_graph_capture_failed'])}: eager)"
                   if "cuda_graph_capture_failed" in figures else "")
                for name, figures in v.items() if name != "as_configured"))
        for k, layout in run.get("encoders_per_gpu", {}).items():
            e = layout["end_to_end"]
            busy = f"{e['gpu_busy_steady']:.0%}" if e.get("gpu_busy_steady") is not None else "n/a"
            lines.append(f"{precision}, decode_on=encoder, {k} encoder(s) per GPU ({layout['encoder_actors']} at "
                         f"num_gpus {layout['num_gpus_each']:g}): ceiling {layout['encoder_ceiling']['pairs_per_s']:.2f}/s, "
                         f"steady {figure(e['steady_pairs_per_s'], 0, '.2f')}/s, ratio to the best ceiling "
                         f"{figure(layout['steady_ratio_to_best_ceiling'], 0, '.3f')}, GPU busy {busy}")
    if "phase_s" in report:
        lines.append(f"time: {report['total_s']} s in all: " + ", ".join(f"{k} {v}" for k, v in report["phase_s"].items()))
    cpu = report["cpu"]
    lines.append(f"CPU per core: {cpu['decode_images_per_s_per_core']} images/s decoded + resized by PIL (decode_on="
                 f"tasks), {cpu['encoder_path_on_cpu_images_per_s_per_core']} by the encoder path on CPU; mean JPEG "
                 f"{cpu['mean_jpeg_kb']} KiB; {cpu['tokenize_captions_per_s_per_core']} captions/s tokenized"
                 + (f"; Ray start {report['ray_start_s']} s" if report["ray"] else ""))
    if "gpu_decode_resize_images_per_s" in cpu:
        lines.append(f"GPU decode + resize (nvJPEG, batch {report['encoder_batch_size']}, one thread): "
                     f"{cpu['gpu_decode_resize_images_per_s']} images/s with the torch resize, "
                     f"{cpu.get('gpu_decode_resize_triton_images_per_s', 'not measured')} with the fused Triton "
                     "kernels (read.device_resize)")
    if "fidelity" in report:
        f = report["fidelity"]
        lines.append(f"fidelity, decode_on=encoder vs the exact path, {f['photos']} photos on {f['device']} "
                     f"({f['decoder']}; {f['weights']}): pixels mean {f['pixel_levels_mean']} / p99 "
                     f"{f['pixel_levels_p99']:g} / max {f['pixel_levels_max']} levels; image embedding max "
                     f"|diff| {f['embedding_max_component_diff']:.2e} per component; |delta similarity| p50 "
                     f"{f['similarity_abs_diff_p50']:.1e}, p99 {f['similarity_abs_diff_p99']:.1e}, max "
                     f"{f['similarity_abs_diff_max']:.1e}; decided differently at min_similarity "
                     + ", ".join(f"{t}: {share:.2%}" for t, share in f["decided_differently"].items())
                     + "; the bound |delta similarity| <= 1e-3 is "
                     + ("met" if f["similarity_abs_diff_max"] <= 1e-3 else "NOT MET"))
    if "corrupted_jpegs" in report.get("fidelity", {}):
        c = report["fidelity"]["corrupted_jpegs"]
        lines.append(f"corrupted JPEGs ({c['jpegs']}): the exact path fails on {c['exact_path_fails']}, "
                     f"{c['of_those_kept_from_the_device']} of them kept from the device decoder; it decodes "
                     f"{c['exact_path_decodes']}, {c['of_those_kept_from_the_device_too']} of those kept from it too")
    if "towers_vs_fp32" in report.get("fidelity", {}):
        f = report["fidelity"]["towers_vs_fp32"]
        lines.append(f"towers at {f['precision']} vs fp32 (exact pixels): max |diff| per component image "
                     f"{f['image_embedding_max_component_diff']:.2e}, text {f['text_embedding_max_component_diff']:.2e}; "
                     f"|delta similarity| p50 {f['similarity_abs_diff_p50']:.1e}, p99 {f['similarity_abs_diff_p99']:.1e}, "
                     f"max {f['similarity_abs_diff_max']:.1e}; decided differently at min_similarity "
                     + ", ".join(f"{t}: {share:.2%}" for t, share in f["decided_differently"].items()))
    if "memory_scaling" in report:
        m = report["memory_scaling"]
        lines.append(f"memory ({m['precision']}, decode_on={m['decode_on']}): {m['pairs_small']} -> {m['pairs_large']} "
                     f"pairs: total PSS sampled {m['peak_mib_small']} -> {m['peak_mib_large']} MiB ({m['growth']:+.1%}); "
                     f"sum of per-process peak RSS {m['peak_rss_sum_mib_small']} -> {m['peak_rss_sum_mib_large']} MiB "
                     f"({m['rss_sum_growth']:+.1%})")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    """Whole or not at all (a kill while writing leaves the previous file): written beside, then renamed. Its
    folder is made if missing (else the first phase's figures, and the failure report, would be lost)."""
    beside = Path(f"{path}.partial")
    beside.parent.mkdir(parents=True, exist_ok=True)
    beside.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    os.replace(beside, path)
