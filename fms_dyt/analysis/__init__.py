"""Pieces of ``python -m fms_dyt.analyze``: reading runs, capturing norm activations, figures, the report."""
