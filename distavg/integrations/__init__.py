"""Integrations with training frameworks; each imports its framework only when used.

Each decides *when* (after a real optimizer step, around evaluation, at checkpoint time) on
the public API, and never *how* to average; ``_save.py`` is their one atomic save.

* :mod:`distavg.integrations.accelerate`: ``accelerator.save_state()`` and
  ``load_state()`` save and restore every rank's shard of the average.
* :mod:`distavg.integrations.lightning`: a ``Callback`` for ``Trainer.fit``.
* :mod:`distavg.integrations.transformers`: a ``TrainerCallback`` for the Hugging Face
  ``Trainer``, and ``export_pretrained``.
* :mod:`distavg.integrations.mmengine`: ``DistAvgHook``, a drop-in for ``EMAHook``.
"""
