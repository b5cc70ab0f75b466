"""The filter job (jobs/filter_pairs.py): from the embed job's tables to keep-lists, filtered shards and a report.

    plan.py      what a run will do, decided before Ray starts: tables, access, the output's settings
    run.py       the driver: config, the similarity rule (threshold or exact top fraction), keep-lists, shards
    dedup.py     near-duplicate groups and evaluation-set leaks, searched on Ray
    concepts.py  rules by meaning: drop or keep pairs whose image is near Chinese text queries
    report.py    the static HTML report: histograms, galleries around the threshold, duplicate groups
"""
