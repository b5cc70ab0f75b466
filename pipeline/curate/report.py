"""The curation report: one static folder (index.html, PNG plots, thumbnails) that opens from disk or a bucket."""

from __future__ import annotations

import html
import io
import json
import logging
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from PIL import Image

from pipeline.io import storage
from pipeline.curate.concepts import ORDER, removed_before_rule
from pipeline.curate.dedup import MATCHES_REFERENCE, NEAR_DUPLICATE, reference_tables
from pipeline.embed.image import without_addresses
from pipeline.embed.read import IMAGE_EXTENSIONS, positioned_members
from pipeline.io.schema import STATUS_OK
from pipeline.io.shards import shard_name
from pipeline.io.tables import read_table, table_name

log = logging.getLogger(__name__)

THUMB_SIDE = 192


def band_candidates(url: str, threshold: float, per_band: int, cfg) -> dict:
    """This table's lowest, nearest-to-threshold and highest ok pairs that dedup left to the rule: merged on the
    driver into global bands."""
    table = read_table(url, cfg.storage, ["key", "shard", "position", "status", "caption", "similarity"])
    ok = table.filter(pc.equal(table.column("status"), STATUS_OK))
    removed = removed_before_rule(cfg, table_name(url))
    if removed:
        ok = ok.filter(pc.invert(pc.is_in(ok.column("position"), pa.array(sorted(removed), pa.int64()))))
    rows = ok.select(["key", "shard", "position", "caption", "similarity"]).to_pylist()
    by_score = sorted(rows, key=lambda r: r["similarity"])
    near = sorted(rows, key=lambda r: abs(r["similarity"] - threshold))
    return {"lowest": by_score[:per_band], "threshold": near[:per_band], "highest": by_score[::-1][:per_band]}


def duplicate_rows(url: str, per_reason: int, storage_cfg) -> dict[str, list[dict]]:
    """The first rows of one duplicates/{shard}.parquet per reason: merged on the driver into the galleries."""
    fs, path = storage.filesystem(url, storage_cfg)
    with fs.open(path, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    return {reason: [r for r in rows if r["reason"] == reason][:per_reason]
            for reason in (NEAR_DUPLICATE, MATCHES_REFERENCE)}


def pair_rows(url: str, positions: list[int], keys: list[str], storage_cfg) -> list[dict]:
    """Rows of one embedding table at `positions`, and its ok rows with `keys` (a kept pair or a reference image
    is named by key): key, shard, position, caption, similarity."""
    table = read_table(url, storage_cfg, ["key", "shard", "position", "status", "caption", "similarity"])
    wanted = pc.or_(pc.is_in(table.column("position"), pa.array(positions, pa.int64())),
                    pc.and_(pc.is_in(table.column("key"), pa.array(keys, pa.string())),
                            pc.equal(table.column("status"), STATUS_OK)))
    return table.filter(wanted).drop_columns(["status"]).to_pylist()


def duplicate_galleries(cfg, files: list[str], per_band: int) -> dict:
    """Up to `per_band` near-duplicate groups (largest first: the kept pair, then the dropped ones) and
    reference matches (closest first: the dropped pair, then the reference image), every pair with its
    shard, position, caption and similarity."""
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    found = [storage.unstrip(fs, p) for p in sorted(fs.ls(storage.join(out, "duplicates"), detail=False))]
    task = ray.remote(num_cpus=cfg.num_cpus)
    parts = ray.get([task(duplicate_rows).remote(u, 4 * per_band, cfg.storage) for u in found])
    groups: dict[tuple, list[dict]] = {}
    for part in parts:
        for r in part[NEAR_DUPLICATE]:
            groups.setdefault((r["match_shard"], r["match_key"]), []).append(r)
    chosen = sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))[:per_band]
    matches = sorted((r for part in parts for r in part[MATCHES_REFERENCE]), key=lambda r: -r["cosine"])[:per_band]

    # the tables that hold each shown pair: ours, or (a reference image) one of dedup_against's, by shard name
    inputs = {table_name(u): u for u in files}
    references = {table_name(t.url): t.url
                  for t in reference_tables(cfg.dedup_against, cfg.storage, exclude=[cfg.embeddings, cfg.output])}
    wanted: dict[tuple[bool, str], tuple[set, set]] = {}  # (is a reference, shard) -> (positions, keys)
    for (kept_shard, kept_key), members in chosen:
        wanted.setdefault((False, kept_shard), (set(), set()))[1].add(kept_key)
        for r in members:
            wanted.setdefault((False, r["shard"]), (set(), set()))[0].add(r["position"])
    for r in matches:
        wanted.setdefault((False, r["shard"]), (set(), set()))[0].add(r["position"])
        wanted.setdefault((True, r["match_shard"]), (set(), set()))[1].add(r["match_key"])
    found_in = {where: (references if where[0] else inputs).get(shard_name(where[1])) for where in wanted}
    places = [where for where in wanted if found_in[where]]
    fetched = ray.get([task(pair_rows).remote(found_in[w], sorted(wanted[w][0]), sorted(wanted[w][1]), cfg.storage)
                       for w in places])
    by_position = {(s, r["position"]): r for (_, s), rows in zip(places, fetched) for r in rows}
    by_key = {}
    for (_, s), rows in zip(places, fetched):
        for r in rows:
            by_key.setdefault((s, r["key"]), r)

    def pair(shard, position=None, key=None, **extra):
        r = by_position.get((shard, position)) if key is None else by_key.get((shard, key))
        fallback = {"key": key, "shard": shard, "position": position, "caption": None, "similarity": None}
        return {**(r or fallback), **extra}

    return {
        "groups": [[pair(shard, key=key, verdict="kept")]
                   + [pair(r["shard"], r["position"], verdict="dropped", cosine=r["cosine"]) for r in members]
                   for (shard, key), members in chosen],
        "references": [[pair(r["shard"], r["position"], verdict="dropped", cosine=r["cosine"]),
                        pair(r["match_shard"], key=r["match_key"], verdict="reference")] for r in matches],
    }


def thumbnails(shard_url: str, positions: list[int], storage_cfg) -> dict[int, bytes]:
    """JPEG thumbnails of the samples at `positions` of one shard (read as the embed job counts samples)."""
    fs, path = storage.filesystem(shard_url, storage_cfg)
    wanted, found = set(positions), {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for position, _, ext, member in positioned_members(tar):
                if position in wanted and ext in IMAGE_EXTENSIONS and position not in found:
                    try:
                        image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
                        out = io.BytesIO()
                        image.save(out, "JPEG", quality=85)
                        found[position] = out.getvalue()
                    except Exception as exc:  # noqa: BLE001 - a thumbnail is best effort; the row still shows
                        log.warning("no thumbnail for %s #%d: %s", shard_url, position, exc)
                if len(found) == len(wanted):
                    break
    except (OSError, EOFError, tarfile.TarError) as exc:  # a source damaged since it was embedded
        log.warning("thumbnails of %s: the shard cannot be read in full (%s): %d of %d found", shard_url,
                    without_addresses(exc), len(found), len(wanted))
    return found


def plots(summary: dict, threshold: float) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    counts = np.array(summary["similarity_histogram"]["counts"])
    edges = np.linspace(-1, 1, len(counts) + 1)
    nonzero = np.flatnonzero(counts)
    lo, hi = (edges[nonzero[0]], edges[nonzero[-1] + 1]) if len(nonzero) else (-1, 1)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
    ax.axvline(threshold, color="#c44e52", linewidth=2, label=f"threshold {threshold:.4f}")
    ax.set_xlim(min(lo, threshold) - 0.05, max(hi, threshold) + 0.05)
    ax.set_xlabel("image-text cosine similarity")
    ax.set_ylabel("pairs")
    kept = summary["kept_fraction_of_ok"]
    ax.set_title(f"similarity of {summary['ok']} ok pairs: {summary['kept']} kept"
                 + (f" ({kept:.1%})" if kept is not None else ""))
    ax.legend()
    figures["histogram.png"] = _png(fig)

    shards = list(summary["shards"].values())
    fractions = [s["kept"] / s["ok"] if s["ok"] else 0.0 for s in shards]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(range(len(shards)), fractions, color="#55a868")
    if shards:
        ax.axhline(float(np.mean(fractions)), color="black", linestyle="--", linewidth=1, label="mean")
        ax.legend()
    ax.set_xticks(range(len(shards)), [s["name"] for s in shards] if len(shards) <= 40 else [""] * len(shards),
                  rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("kept fraction of ok pairs")
    ax.set_title("per shard: an outlier shard stands out")
    figures["shards.png"] = _png(fig)

    reasons = summary["errors_by_reason"]
    fig, ax = plt.subplots(figsize=(8, max(1.5, 0.4 * len(reasons) + 1)))
    if reasons:
        names = sorted(reasons, key=reasons.get)
        ax.barh(names, [reasons[n] for n in names], color="#dd8452")
    else:
        ax.text(0.5, 0.5, "no error rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("error rows")
    ax.set_title(f"{summary['errors']} error rows by reason (always dropped)")
    figures["errors.png"] = _png(fig)
    return figures


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(cfg, summary: dict, files: list[str], threshold: float, concept_galleries: dict | None = None) -> str:
    """Write {output}/report/: index.html, histogram/shards/errors PNGs, gallery thumbnails. Returns its URL."""
    per_band = cfg.gallery_per_band
    parts = ray.get([ray.remote(num_cpus=cfg.num_cpus)(band_candidates).remote(f, threshold, per_band, cfg)
                     for f in files])
    bands = {
        "lowest": sorted((r for p in parts for r in p["lowest"]), key=lambda r: r["similarity"])[:per_band],
        # the nearest to the threshold, shown in score order: the cut falls between two neighbours
        "threshold": sorted(sorted((r for p in parts for r in p["threshold"]),
                                   key=lambda r: abs(r["similarity"] - threshold))[:per_band],
                            key=lambda r: -r["similarity"]),
        "highest": sorted((r for p in parts for r in p["highest"]), key=lambda r: -r["similarity"])[:per_band],
    }
    galleries = duplicate_galleries(cfg, files, per_band) if summary["duplicates"] else {}
    concept_rows = [rows for rule in (concept_galleries or {}).values() for rows in rule.values()]
    thumbs = fetch_thumbnails(cfg, [*bands.values(), *galleries.get("groups", []), *galleries.get("references", []),
                                    *concept_rows])
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    folder = storage.join(out, "report")
    for name, png in plots(summary, threshold).items():
        storage.write_atomically(fs, storage.join(folder, name), png)
    names = write_thumbnails(fs, folder, thumbs)
    page = render_html(summary, threshold, bands, names, galleries, concept_galleries or {})
    storage.write_atomically(fs, storage.join(folder, "index.html"), page.encode("utf-8"))
    url = storage.unstrip(fs, storage.join(folder, "index.html"))
    log.info("report written to %s", url)
    return url


def fetch_thumbnails(cfg, galleries: list[list[dict]]) -> dict[tuple[str, int], bytes]:
    """{(shard, position): JPEG} for every row of `galleries`: one Ray task per source shard."""
    wanted: dict[str, set[int]] = {}
    for rows in galleries:
        for r in rows:
            if r["position"] is not None:
                wanted.setdefault(r["shard"], set()).add(r["position"])
    shards = list(wanted)
    fetched = ray.get([ray.remote(num_cpus=cfg.num_cpus)(thumbnails).remote(s, sorted(wanted[s]), cfg.storage)
                       for s in shards])
    return {(s, pos): data for s, found in zip(shards, fetched) for pos, data in found.items()}


def write_thumbnails(fs, folder: str, thumbs: dict) -> dict[tuple[str, int], str]:
    names = {}
    for i, ((shard, position), data) in enumerate(sorted(thumbs.items())):
        names[(shard, position)] = f"thumbs/{i:04d}.jpg"
        storage.write_atomically(fs, storage.join(folder, names[(shard, position)]), data)
    return names


def write_concept_preview(cfg, models: dict, concepts: dict, galleries: dict) -> str:
    """concepts_dry_run: {output}/concepts_preview/index.html, the concept galleries alone; nothing else is
    written. Returns its URL."""
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    folder = storage.join(out, "concepts_preview")
    names = write_thumbnails(fs, folder, fetch_thumbnails(cfg, [rows for rule in galleries.values()
                                                                for rows in rule.values()]))
    banner = RANDOM_BANNER if models.get("random_weights") else ""
    page = PAGE.format(title="Concept preview", body=f"""<h1>Concept preview (dry run)</h1>{banner}
<p>Nothing was filtered or written but this page. The galleries cover every ok pair (dedup does not run in a dry
run). Pick each rule's threshold where the pairs above it are the ones the rule should take.</p>
{concepts_html(concepts, galleries, names)}""")
    storage.write_atomically(fs, storage.join(folder, "index.html"), page.encode("utf-8"))
    url = storage.unstrip(fs, storage.join(folder, "index.html"))
    log.info("concept preview written to %s", url)
    return url


CONCEPT_BANDS = {"nearest": "Nearest to its queries", "above": "Just above the threshold (the query matches)",
                 "below": "Just below the threshold (no query matches)"}


def concepts_html(concepts: dict | None, galleries: dict, thumbs: dict) -> str:
    """Per rule: what it is, what it took, and its galleries with each pair's nearest query and cosine."""
    if not concepts:
        return ""
    esc = html.escape
    parts = [f"<h2>Concept rules</h2><p>Order: {esc(ORDER)}. Queries embedded by "
             f"<code>{esc(str(concepts['queries_embedded_by'].get('text_model')))}</code>.</p>"]
    for rule in concepts["rules"]:
        taken = "pairs it would drop" if concepts.get("dry_run") else "pairs dropped"
        parts.append(f"<h3>{esc(rule['name'])}: {esc(rule['action'])} at cosine &gt;= {rule['threshold']:g} of "
                     f"{esc(' / '.join(rule['queries']))} ({rule['dropped']} {taken})</h3>")
        for band, title in CONCEPT_BANDS.items():
            cards = []
            for r in galleries.get(rule["name"], {}).get(band, []):
                matches = np.float32(r["cosine"]) >= np.float32(rule["threshold"])
                verdict = "dropped" if matches == (rule["action"] == "drop") else "kept"
                cards.append(card(r, verdict, thumbs, f' · cos {r["cosine"]:.4f} to {esc(r["query"])}'))
            parts.append(f'<h4>{title}</h4><div class="band">{"".join(cards) or "<p>none</p>"}</div>')
    return "".join(parts)


BAND_TITLES = {"lowest": "Lowest similarity (dropped first)", "threshold": "Around the threshold",
               "highest": "Highest similarity"}


def card(r: dict, verdict: str, thumbs: dict, note: str = "") -> str:
    """One pair: thumbnail, similarity, verdict (kept | dropped | reference), caption, key."""
    esc = html.escape
    src = thumbs.get((r["shard"], r["position"]))
    image = f'<img src="{esc(src)}" alt="{esc(str(r["key"]))}">' if src else '<div class="noimg">no image</div>'
    # scores are float32: 6 decimals tell neighbours apart (4 showed "-0.0239 kept" beside "-0.0239 dropped")
    score = f'<b>{r["similarity"]:.6f}</b> ' if r.get("similarity") is not None else ""
    return (f'<figure class="{verdict}">{image}<figcaption>{score}<span class="verdict">{verdict}</span>{note}'
            f'<br>{esc(r["caption"] or "")}<br><small>{esc(str(r["key"]))}</small></figcaption></figure>')


def duplicates_html(summary: dict, galleries: dict, thumbs: dict) -> str:
    if not summary["duplicates"]:
        return ""
    dups = summary["duplicates"]
    groups = "".join(
        '<div class="band">' + "".join(card(r, r["verdict"], thumbs, f' · cos {r["cosine"]:.4f} to the kept'
                                            if "cosine" in r else "") for r in group) + "</div>"
        for group in galleries["groups"]) or "<p>No near-duplicates.</p>"
    references = "".join(
        '<div class="band">' + card(dropped, "dropped", thumbs, f' · cos {dropped["cosine"]:.4f}')
        + card(reference, "reference", thumbs) + "</div>"
        for dropped, reference in galleries["references"]) or "<p>No matches of reference images.</p>"
    return f"""<h2>Near-duplicates</h2>
<p>Image cosine &gt;= {dups["threshold"]}: {dups["near_duplicate"]} pairs dropped from {dups["groups"]} groups,
each group keeping its highest-similarity pair (first in each row), and {dups["matches_reference"]} pairs dropped
as matches of the reference images of <code>{html.escape(str(dups["against"]))}</code>.
Look at these rows at a few thresholds before choosing one.</p>
<h3>Groups (largest first)</h3>{groups}
<h3>Matches of reference images (closest first: the dropped pair, then the reference)</h3>{references}
"""


def kept_by_rule(similarity: float, threshold: float) -> bool:
    """The filter job's own comparison (float32, as filter_table makes it), so a card never contradicts the
    keep-list."""
    return bool(np.float32(similarity) >= np.float32(threshold))


RANDOM_BANNER = ('<p style="background:#fdd;padding:8px"><b>These scores come from RANDOM weights (demo or '
                 'benchmark): they mean nothing.</b></p>')
# one page layout for the report and the concept preview; {title} and {body} are filled in
PAGE = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 2px 12px; text-align: left; }}
.band {{ display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 16px; }}
figure {{ width: 200px; margin: 0; padding: 6px; border: 3px solid #ccc; border-radius: 6px; }}
figure.kept {{ border-color: #55a868; }} figure.dropped {{ border-color: #c44e52; }}
figure.reference {{ border-color: #4c72b0; }}
figure img {{ max-width: 192px; max-height: 192px; display: block; margin: auto; }}
figcaption {{ font-size: 13px; margin-top: 4px; }} .noimg {{ height: 96px; background: #eee; }}
</style></head>
<body>
{body}
<script>
// for headless checks: how many images decoded
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""


def render_html(summary: dict, threshold: float, bands: dict, thumbs: dict, galleries: dict,
                concept_galleries: dict) -> str:
    esc = html.escape
    rule = ", ".join(f"{k} = {v}" for k, v in summary["rule"].items())
    kept = summary["kept_fraction_of_ok"]
    gallery = []
    for band, rows in bands.items():
        cards = [card(r, "kept" if kept_by_rule(r["similarity"], threshold) else "dropped", thumbs) for r in rows]
        gallery.append(f'<h3>{BAND_TITLES[band]}</h3><div class="band">{"".join(cards)}</div>')
    stats = {"pairs": summary["pairs"], "ok": summary["ok"], "error rows": summary["errors"],
             "kept": summary["kept"], "dropped": summary["dropped"],
             "kept fraction of ok": f"{kept:.2%}" if kept is not None else "n/a", "threshold": f"{threshold:.6f}"}
    if summary["duplicates"]:
        stats["dropped as near-duplicates"] = summary["duplicates"][NEAR_DUPLICATE]
        stats["dropped as matches of reference images"] = summary["duplicates"][MATCHES_REFERENCE]
    for concept in (summary.get("concepts") or {}).get("rules", []):
        stats[f"dropped by concept {concept['name']}"] = concept["dropped"]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in stats.items())
    body = f"""<h1>Curation report</h1>
{RANDOM_BANNER if summary["models"].get("random_weights") else ""}
<p>Rule: {esc(rule)}. Embeddings: <code>{esc(str(summary["embeddings"]))}</code>.
Models: <code>{esc(str(summary["models"].get("text_model")))}</code> +
<code>{esc(str(summary["models"].get("image_model")))}</code>.
Error rows are always dropped. Similarity scores are specific to the model that produced them.</p>
<table>{rows}</table>
<h2>Similarity distribution</h2><img src="histogram.png" alt="similarity histogram">
<h2>Kept fraction per shard</h2><img src="shards.png" alt="kept fraction per shard">
<h2>Errors by reason</h2><img src="errors.png" alt="errors by reason">
<h2>What the threshold drops</h2>
{"".join(gallery)}
{duplicates_html(summary, galleries, thumbs)}
{concepts_html(summary.get("concepts"), concept_galleries, thumbs)}
<script type="application/json" id="summary">{esc(json.dumps({k: summary[k] for k in ("pairs", "ok", "kept")}))}</script>"""
    return PAGE.format(title="Curation report", body=body)
