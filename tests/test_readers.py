"""The embedding tables read the way users read them: DuckDB, Polars, pandas and Spark, without Ray."""

import shutil
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from conftest import job_config, make_shards
from pipeline.embed.run import run_embed_job


@pytest.fixture(scope="module")
def outputs(local_ray, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    make_shards(root / "shards", 2, 5)
    for dtype in ("float16", "float32"):
        run_embed_job(job_config(tiny_models, f"{root}/shards/*.tar", str(root / dtype),
                                 f"write.embedding_dtype={dtype}"))
    similarity = {r["key"]: r["similarity"] for p in sorted((root / "float16" / "embeddings").glob("*.parquet"))
                  for r in pq.read_table(p, columns=["key", "similarity"]).to_pylist()}
    return root, similarity


def run_reader(code: str) -> list[tuple[str, float, float]]:
    """Run `code` in a fresh interpreter that must not import Ray; it prints key,stored,recomputed lines."""
    script = textwrap.dedent(code) + "\nimport sys\nassert 'ray' not in sys.modules, 'the reader pulled in Ray'\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(",") for line in result.stdout.splitlines() if line.count(",") == 2]
    return [(k, float(a), float(b)) for k, a, b in rows]


def check(rows, similarity, tolerance):
    assert sorted(k for k, _, _ in rows) == sorted(similarity)
    for key, stored, recomputed in rows:
        assert abs(stored - similarity[key]) < 1e-6
        assert abs(recomputed - stored) < tolerance, key  # the two vectors give the stored cosine back


def test_duckdb(outputs):
    root, similarity = outputs
    rows = run_reader(f"""
        import duckdb
        for key, stored, recomputed in duckdb.sql('''
            SELECT key, similarity,
                   list_cosine_similarity(image_embedding::FLOAT[], text_embedding::FLOAT[])
            FROM read_parquet('{root}/float16/embeddings/*.parquet') WHERE status = 'ok' ''').fetchall():
            print(f"{{key}},{{stored}},{{recomputed}}")
    """)
    check(rows, similarity, 2e-3)


def test_polars(outputs):
    root, similarity = outputs
    rows = run_reader(f"""
        import polars as pl
        df = pl.read_parquet('{root}/float16/embeddings/*.parquet').filter(pl.col('status') == 'ok')
        image = df['image_embedding'].to_numpy().astype('float32')
        text = df['text_embedding'].to_numpy().astype('float32')
        for key, stored, recomputed in zip(df['key'], df['similarity'], (image * text).sum(1)):
            print(f"{{key}},{{stored}},{{recomputed}}")
    """)
    check(rows, similarity, 2e-3)


def test_pandas(outputs):
    root, similarity = outputs
    rows = run_reader(f"""
        import numpy as np, pandas as pd
        df = pd.read_parquet('{root}/float16/embeddings/')
        df = df[df.status == 'ok']
        image = np.stack(df.image_embedding.to_list()).astype('float32')
        text = np.stack(df.text_embedding.to_list()).astype('float32')
        for key, stored, recomputed in zip(df.key, df.similarity, (image * text).sum(1)):
            print(f"{{key}},{{stored}},{{recomputed}}")
    """)
    check(rows, similarity, 2e-3)


@pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a Java runtime")
def test_spark_reads_float32_tables(outputs):
    root, similarity = outputs
    rows = run_reader(f"""
        from pyspark.sql import SparkSession, functions as F
        spark = (SparkSession.builder.master('local[1]').config('spark.ui.enabled', 'false')
                 .config('spark.driver.bindAddress', '127.0.0.1').getOrCreate())
        df = spark.read.parquet('{root}/float32/embeddings').where("status = 'ok'")
        dot = F.aggregate(F.zip_with('image_embedding', 'text_embedding', lambda a, b: a * b), F.lit(0.0),
                          lambda acc, x: acc + x)
        for row in df.select('key', 'similarity', dot.alias('recomputed')).collect():
            print(f"{{row.key}},{{row.similarity}},{{row.recomputed}}")
        spark.stop()
    """)
    check(rows, similarity, 2e-3)
