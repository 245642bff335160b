"""The training loop and what it stands on.

- :mod:`cellssl.engine.fit` — ``fit``: one training run, a loop of named steps
- :mod:`cellssl.engine.loader` — multi-view batches seeded by (seed, epoch, image)
- :mod:`cellssl.engine.guard` — non-finite losses: skip the update, name the cause, stop a streak
- :mod:`cellssl.engine.watchdog` — stalls, SIGINT/SIGTERM at a step boundary
- :mod:`cellssl.engine.hardware` — what the CPU does fast (native bf16) and the settings that follow
- :mod:`cellssl.engine.checkpoint` — atomic writes, safe loads, resume, backbone specs (``random:``,
  ``pixels:``, ``pretrained:``), ``init_from`` weight transfer
- :mod:`cellssl.engine.distributed` — torchrun / DDP set-up and a resumable distributed sampler
- :mod:`cellssl.engine.optim` — optimisers (AdamW, SGD, LARS) and the LR schedule
- :mod:`cellssl.engine.logger` — ``metrics.jsonl`` and TensorBoard events
"""
