"""Integrations with training frameworks; each imports its framework only when used.

* :mod:`distavg.integrations.accelerate`: ``accelerator.save_state()`` and
  ``load_state()`` save and restore every rank's shard of the average.
"""
