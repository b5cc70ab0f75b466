"""The README's commands, read from the README itself: each runs here on the demo's data, or names the test
that covers it (cluster, S3, user data). A command added to the README without either fails this test."""

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# run here, in this order, in a copy of the repository (the demo writes demo_data/ where it runs)
RUN_HERE = [
    r"^pip install torch==2\.13\.0 -e \. && python jobs/embed_wukong\.py --config configs/demo\.yaml$",
    r"^python jobs/filter_pairs\.py --config configs/filter\.yaml$",
    r"^python jobs/filter_pairs\.py --config configs/filter\.yaml --set min_similarity=0\.2 --set output=demo_data/",
    r"^python jobs/benchmark\.py --tiny ",
    r"^python jobs/filter_pairs\.py --config configs/filter-concepts\.yaml --set concepts_dry_run=true$",
    r"^python jobs/filter_pairs\.py --config configs/filter-concepts\.yaml$",
]
# the README's commands for a GPU cluster and a cloud bucket: run here as written, with --dry-run appended
# (they need GPUs and the real weights to do the work), against a local S3 server that holds the buckets
# they name, and a Hugging Face cache that holds the model ids they name (offline)
DRY_RUN = [r"^ray job submit .* python jobs/embed_wukong\.py ", r"^0 [25] \* \* \* .*ray job submit ",
           r"^python jobs/filter_pairs\.py .*--set embeddings=s3://"]

# covered elsewhere: (pattern, test file, test function)
COVERED = [
    (r'^pip install torch==2\.13\.0 -e "\.\[test\]" && python -m pytest -q$', ".ci/run", None),
    (r"^ray up cluster\.yaml$", "tests/test_cluster_yaml.py", "test_cluster_yaml_is_valid"),
    (r"^ray dashboard cluster\.yaml &$", "tests/test_cluster_yaml.py", "test_cluster_yaml_is_valid"),
    (DRY_RUN[0], "tests/test_readme.py", "test_readme_cluster_and_cloud_commands_dry_run"),
    (DRY_RUN[1], "tests/test_readme.py", "test_readme_cluster_and_cloud_commands_dry_run"),
    (DRY_RUN[2], "tests/test_readme.py", "test_readme_cluster_and_cloud_commands_dry_run"),
    (r"^python jobs/eval_retrieval\.py ", "tests/test_rerun.py", "test_the_eval_command_runs_as_documented"),
    (r"^python jobs/benchmark\.py --config configs/benchmark(-gpu)?\.yaml", "tests/test_benchmark.py",
     "test_benchmark_smoke"),
    (r"^python jobs/benchmark_dedup\.py --copy-cosines ", "tests/test_benchmark.py", "test_copy_cosines_smoke"),
    (r"^python jobs/benchmark_dedup\.py(?! --copy-cosines)", "tests/test_benchmark.py", "test_dedup_benchmark_smoke"),
]


def readme_commands() -> list[str]:
    """Every command of the README's bash and cron blocks: continuations joined, comments and spacing dropped."""
    commands = []
    for block in re.findall(r"^```(?:bash|cron)\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_is_run_here_or_covered_by_a_named_test():
    commands = readme_commands()
    assert len(commands) >= 12
    for command in commands:
        here = [p for p in RUN_HERE if re.search(p, command)]
        elsewhere = [c for c in COVERED if re.search(c[0], command)]
        assert len(here) + len(elsewhere) == 1, f"README command not classified exactly once: {command}"
        for _, path, function in elsewhere:
            text = (REPO / path).read_text()
            assert (f"def {function}(" in text) if function else (command in text), (command, path, function)
    for pattern in RUN_HERE + [c[0] for c in COVERED]:
        assert any(re.search(pattern, c) for c in commands), f"no README command matches {pattern}"


# an error-level line: Python logging's, Ray's C++ logs ("[time E pid tid]"), or a traceback
ERROR_LINE = re.compile(r" ERROR |^\[[^\]]* E \d+ \d+\]|Traceback \(most recent call last\)", re.M)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme") / "repo"
    for name in ("pipeline", "jobs", "configs"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    if "&&" in command:  # the install half is what .ci/run has just done
        command = command.split("&&", 1)[1].strip()
    command = re.sub(r"^python ", f"{sys.executable} ", command)
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-5000:]
    # a successful run prints no deprecation warning and no error-level line
    assert "deprecat" not in printed.lower(), [l for l in printed.splitlines() if "eprecat" in l]
    assert not ERROR_LINE.search(printed), ERROR_LINE.search(printed).group(0)
    assert "\x1b[" not in printed  # a log file or a pipe gets no ANSI colour codes (workers' lines included)
    return result


def command_for(pattern: str) -> str:
    (command,) = [c for c in readme_commands() if re.search(pattern, c)]
    return command


def test_readme_demo_then_filter_with_each_rule_and_the_report(checkout):
    printed = run(command_for(RUN_HERE[0]), checkout).stdout
    assert '"shards_committed": 3' in printed and '"samples": 49' in printed and '"random_weights": true' in printed
    assert len(list((checkout / "demo_data" / "output" / "embeddings").glob("*.parquet"))) == 3

    printed = run(command_for(RUN_HERE[1]), checkout).stdout
    assert '"rule": {"keep_top_fraction": 0.5}' in printed and '"ok": 47' in printed
    # the README's example is what a fresh run prints, figure for figure (the random weights are the same on
    # every machine with the same library versions)
    readme = (REPO / "README.md").read_text()
    documented = re.search(r"^summary: (\{\"rule\".*?\})\n```", readme, re.S | re.M).group(1)
    line = next(l for l in printed.splitlines() if l.startswith("summary: "))
    versions = re.search(r"these figures: torch (\S+), transformers\s+(\S+)\)", readme).groups()
    import torch
    import transformers

    if (torch.__version__.split("+")[0], transformers.__version__) == versions:
        assert json.loads(line[len("summary: "):]) == json.loads(documented)
    else:  # other versions may initialise other weights: the README says so
        warnings.warn(f"README's demo figures are for torch/transformers {versions}, not checked here")
    report = checkout / "demo_data" / "filtered" / "report" / "index.html"
    assert report.exists() and "<img" in report.read_text()
    assert len(list((checkout / "demo_data" / "filtered" / "shards").glob("*.tar"))) == 3

    command = command_for(RUN_HERE[2])
    printed = run(command, checkout).stdout
    assert '"rule": {"min_similarity": 0.2}' in printed  # the command line's rule replaced the file's
    output = checkout / re.search(r"--set output=(\S+)", command).group(1)
    assert len(list((output / "keep").glob("*.parquet"))) == 3


def test_readme_concept_rules_preview_then_apply(checkout):
    if not (checkout / "demo_data" / "output" / "embeddings").exists():
        run(command_for(RUN_HERE[0]), checkout)
    run(command_for(RUN_HERE[4]), checkout)
    curated = checkout / "demo_data" / "curated"
    assert [p.relative_to(curated).as_posix() for p in curated.rglob("*") if p.is_file() and "thumbs" not in p.parts] \
        == ["concepts_preview/index.html"]  # a dry run writes its preview and nothing else
    printed = run(command_for(RUN_HERE[5]), checkout).stdout
    assert '"random_weights": true' in printed
    summary = json.loads((curated / "summary.json").read_text())
    assert [r["name"] for r in summary["concepts"]["rules"]] == ["watermark", "qr_code", "text_screenshot",
                                                                 "advertisement"]
    assert len(list((curated / "concepts").glob("*.parquet"))) == 3 and "Concept rules" in (
        curated / "report" / "index.html").read_text()


def test_readme_benchmark_smoke(checkout):
    printed = run(command_for(RUN_HERE[3]), checkout).stdout
    assert "ceiling/s" in printed and "steady/s" in printed
    assert (checkout / "benchmark.json").exists()


def hub_cache(folder: Path, tiny_models) -> Path:
    """A Hugging Face cache (the layout hf download writes) holding configs/wukong.yaml's model ids, offline."""
    text, image = tiny_models
    for repo, source in (("IDEA-CCNL/Taiyi-CLIP-Roberta-102M-Chinese", text), ("openai/clip-vit-base-patch32", image)):
        model = folder / ("models--" + repo.replace("/", "--"))
        shutil.copytree(source, model / "snapshots" / ("0" * 40))
        (model / "refs").mkdir(parents=True)
        (model / "refs" / "main").write_text("0" * 40)
    return folder


def as_run_here(command: str) -> str:
    """The job's own command line out of a `ray job submit ... -- python ...` or a crontab line, as the
    cluster's head would run it: cron's escaped % unescaped, the log redirection dropped, --dry-run added."""
    command = command.split(" -- ", 1)[1] if " -- " in command else command
    command = re.sub(r"\s*>>.*$", "", command).replace(r"\%", "%")
    return command + " --dry-run"


def test_readme_cluster_and_cloud_commands_dry_run(checkout, tiny_models, tmp_path):
    import datetime
    import os

    from conftest import make_shards
    from s3_server import moto_server, upload_folder
    from test_filter import synthetic_tables

    commands = [c for c in readme_commands() if any(re.search(p, c) for p in DRY_RUN)]
    assert len(commands) == 5, commands
    today = datetime.date.today().isoformat()  # the crontab lines' $(date +%F)
    yesterday = (datetime.date.today() - datetime.timedelta(days=1)).isoformat()
    make_shards(tmp_path / "shards", 2, 3)
    synthetic_tables(tmp_path / "emb", [[0.1, 0.2, 0.3]] * 2)
    with moto_server() as endpoint:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="my-bucket")
        for prefix in ("wukong", f"wukong/{today}"):
            upload_folder(endpoint, "my-bucket", tmp_path / "shards", prefix)
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "AWS_ENDPOINT_URL": endpoint,
               "HF_HUB_CACHE": str(hub_cache(tmp_path / "hub", tiny_models)), "HF_HUB_OFFLINE": "1"}
        # the embed commands first, on outputs that hold nothing yet; then the filter commands on what an embed
        # run left there
        for command in sorted(commands, key=lambda c: "filter_pairs" in c):
            if "filter_pairs" in command and not s3.list_objects_v2(Bucket="my-bucket", Prefix="wukong-emb").get("Contents"):
                for prefix in ("wukong-embeddings/embeddings", f"wukong-emb/{today}/embeddings",
                               f"wukong-emb/{yesterday}/embeddings", "eval/flickr30k-cn-test/embeddings",
                               f"curated/{yesterday}/keep"):  # dedup_against: yesterday's curation, an eval set
                    upload_folder(endpoint, "my-bucket", tmp_path / "emb" / "embeddings", prefix)
                s3.put_object(Bucket="my-bucket", Key=f"curated/{yesterday}/summary.json",
                              Body=json.dumps({"embeddings": f"s3://my-bucket/wukong-emb/{yesterday}/"}).encode())
            line = re.sub(r"^python ", f"{sys.executable} ", as_run_here(command))
            result = subprocess.run(["bash", "-c", line], cwd=checkout, capture_output=True, text=True, timeout=300,
                                    env=env)
            printed = result.stdout + result.stderr
            assert result.returncode == 0, (command, printed[-3000:])
            report = json.loads(re.search(r"^dry run: (\{.*?^\})", result.stdout, re.S | re.M).group(1))
            if "embed_wukong" in command:
                named = 10_000 if "{00000..09999}" in command else 2  # a brace range names its shards, a glob finds them
                assert report["shards_in_input"] == report["to_embed"] == named, (command, report)
                assert report["first_shards"][0].endswith("/00000.tar"), report["first_shards"]
                assert report["random_weights"] is False and report["ray_resources"]["encode"]["num_gpus"] == 1
            else:
                assert report["tables"] == 2 and report["already_written"] == 0, (command, report)
            assert not ERROR_LINE.search(printed), (command, ERROR_LINE.search(printed).group(0))
        # a dry run wrote nothing: the buckets hold what the test put there
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="my-bucket").get("Contents", []))
        assert all(k.startswith(("wukong/", "wukong-embeddings/embeddings/", "wukong-emb/", "eval/", "curated/"))
                   for k in keys), keys
        assert not [k for k in keys if k.startswith("curated/" + today)], keys
