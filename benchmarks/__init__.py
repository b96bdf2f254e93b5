"""Speed benchmarks, each a ratio against a reference measured in the same run.

``python -m benchmarks`` runs them all and prints one table (see ``benchmarks/__main__.py``);
each script also runs alone (``python benchmarks/views.py --help``).
"""
