"""The chaos run, short (jobs/chaos.py publishes the long one): the job's own read, encoder, write and commit
processes SIGKILLed at random moments (each stage at least once) and a worker node lost during one run on a
multi-node cluster."""

from pipeline.bench.chaos import STAGES, make_chaos_shards, worker_phase


def test_one_run_survives_kills_of_its_workers_and_actors_and_a_node_loss(tiny_models, tmp_path):
    # enough work that the kills, 0.1-0.5 s apart, land while the job runs, also on a quiet machine
    expected = make_chaos_shards(tmp_path / "shards", 60, 16)
    report = worker_phase(tmp_path, expected, tiny_models, kills=6, node_losses=1, seed=1, baseline=False,
                          interval_s=(0.1, 0.5))
    log = (tmp_path / "chaos.log").read_text()[-4000:]
    assert report["worker_and_actor_kills"] >= 6 and report["node_losses"] == 1, report
    assert set(report["kills"]) <= set(STAGES)
    assert report["kills"].get("encoder", 0) >= 1, report["kills"]  # an actor mid-batch ...
    assert sum(n for stage, n in report["kills"].items() if stage != "encoder") >= 1, report["kills"]  # ... and tasks
    assert report["exit_code"] == 0, log  # without a rerun
    check = report["check"]
    assert check["lost"] == [] and check["duplicated"] == [] and check["unexpected"] == [], check
    assert check["wrongly_errored"] == [] and check["bad_not_errored"] == [], check
    assert check["rows"] == len(expected)
    summary = report["summary"]  # and the summary says what the tables hold
    assert summary["samples"] == len(expected) and summary["shards_committed"] == 60 and summary["shards_failed"] == 0
    assert summary["ok"] == sum(s == "ok" for s in expected.values())
