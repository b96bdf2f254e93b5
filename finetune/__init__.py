"""Supervised N/P fine-tuning with SAM/ASAM, clinical metrics and CAM figures (``python -m finetune``).

Parts: ``config`` (FinetuneConfig), ``sam`` (the step functions and optimizer), ``augment``
(training-batch augmentation), ``model`` (classifier + checkpoint), ``train`` (the loop and the
run), ``cam`` (Grad-CAM and guided-attention figures), ``predict`` (probabilities for new images).
"""

from __future__ import annotations

from .config import FinetuneConfig

__all__ = ["FinetuneConfig"]
