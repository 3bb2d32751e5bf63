"""The training stages, each from a model folder to a model folder: SFT (:mod:`.sft`), and DPO, ORPO
and KTO (:mod:`.preference`), each an entry of :data:`.methods.METHODS` run through the one sequence
of :mod:`.common` (:func:`.common.run_stage`), which reads the entry.

Each stage checks everything (config, model folder, data) before any long work, trains with the
one loop, and ends in a run folder holding ``metrics.jsonl``, plots, ``bad_rows.jsonl`` when rows
were skipped, ``config.yaml``, ``checkpoints/`` (see :mod:`criteriapo.train.checkpoint`) and
``model/``: a standard Hugging Face model folder. With ``resume``, a stage goes on from its latest
valid checkpoint, after checking that its config and data are those the checkpoint was made with.
"""
