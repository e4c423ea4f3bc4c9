"""The run contract every training recipe shares (stage 1, stage 2, the demo CLIP baseline, LLaVA):

- ``accelerator.py``  the accelerate Accelerator; the launch values under DeepSpeed; a micro-batch's
                      backward and gradient clipping under every launch (one process, DDP, FSDP, DeepSpeed)
- ``optim.py``        the optimiser: AdamW or 8-bit AdamW (``train.optimizer``)
- ``schedule.py``     the learning-rate schedule
- ``checkpoints.py``  atomic checkpoints, an exact resume, a damaged latest one set aside
- ``run_dir.py``      the run folder: resolved config and versions, the training log, train_stats.json
- ``resume.py``       THE resume rule (``may_change_on_resume``), for every recipe and the pipeline
- ``grad_cache.py``   gradient-cache accumulation: a whole batch's contrastive loss, a micro-batch at a time
- ``recipe.py``       what a training recipe is: setup / batches / step / report / checkpoints / save
- ``loop.py``         the driver that runs every recipe: optimiser, resume, loop, clipping, log, checkpoints

Library code: it never imports a recipe, the CLI or the pipeline (``tests/test_import_rules.py``).
"""
