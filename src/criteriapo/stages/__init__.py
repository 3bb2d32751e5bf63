"""The training stages, each from a model folder to a model folder: SFT (:mod:`.sft`), and DPO, ORPO
and KTO (:mod:`.preference`), around the common sequence of :mod:`.common`.

Each stage checks everything (config, model folder, data) before any long work, trains with the
one loop, and ends in a run folder holding ``metrics.jsonl``, plots, ``bad_rows.jsonl`` when rows
were skipped, ``config.yaml``, ``checkpoints/`` (see :mod:`criteriapo.train.checkpoint`) and
``model/``: a standard Hugging Face model folder. With ``resume``, a stage goes on from its latest
valid checkpoint, after checking that its config and data are those the checkpoint was made with.
"""
