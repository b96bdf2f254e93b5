"""Linear-probe and kNN robustness reports of frozen representations under stain, scale and domain shift.

``python -m eval_probes --config configs/probes/<name>.yaml [key=value ...]``; in Python,
``eval_probes.run.run(ProbeConfig(...))`` returns the report dict it writes to ``report.json``.
"""

from eval_probes.config import ProbeConfig

__all__ = ["ProbeConfig"]
