"""Evaluation: encode every text and video once, score all pairs, metrics, report."""
