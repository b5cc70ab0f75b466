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
# covered elsewhere: (pattern, test file, test function)
COVERED = [
    (r'^pip install torch==2\.13\.0 -e "\.\[test\]" && python -m pytest -q$', ".ci/run", None),
    (r"^ray up cluster\.yaml$", "tests/test_cluster_yaml.py", "test_cluster_yaml_is_valid"),
    (r"^ray dashboard cluster\.yaml &$", "tests/test_cluster_yaml.py", "test_cluster_yaml_is_valid"),
    (r"^ray job submit .* python jobs/embed_wukong\.py --config configs/wukong\.yaml .*s3://",
     "tests/test_ray_job_submit.py", "test_ray_job_submit_s3_to_s3"),
    (r"^0 2 \* \* \* .*ray job submit .* python jobs/embed_wukong\.py", "tests/test_ray_job_submit.py",
     "test_ray_job_submit_s3_to_s3"),
    (r"^python jobs/filter_pairs\.py .*--set embeddings=s3://", "tests/test_ray_job_submit.py",
     "test_ray_job_submit_s3_to_s3"),
    (r"^python jobs/eval_retrieval\.py ", "tests/test_rerun.py", "test_the_eval_command_runs_as_documented"),
    (r"^python jobs/benchmark\.py --config configs/benchmark(-gpu)?\.yaml", "tests/test_benchmark.py",
     "test_benchmark_smoke"),
    (r"^0 5 \* \* \* .*ray job submit .* python jobs/filter_pairs\.py .*dedup_against=\[s3://b/curated/\*",
     "tests/test_dedup.py", "test_against_what_a_filter_job_kept"),
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
