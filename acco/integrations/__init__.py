"""Integrations of ``AccoOptimizer`` with training frameworks.

* ``acco.integrations.hf.AccoTrainer``: a ``transformers.Trainer`` whose optimizer is ACCO
  (``pip install 'acco[hf]'``). Its module docstring also shows the ``accelerate`` pattern without Trainer.

Nothing here is imported by ``import acco``: each integration imports its framework only when used.
"""
