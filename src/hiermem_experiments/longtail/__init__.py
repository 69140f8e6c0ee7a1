"""The long-tail knowledge demo: real city facts mentioned with Zipf-distributed frequency (docs/method.md §7.7, §9).

* ``corpus``:  the corpus (documents, probes, held-out text), written as JSONL (`hiermem corpus`);
* ``buckets``: frequency buckets by training mentions and the leaf-prior baseline;
* ``jobs``:    the subprocess scheduler for the demo's clustering, trainings and evaluations;
* ``demo``:    presets (``presets/*.yaml``), job configs, evaluation, report and plot (`hiermem demo`).
"""
