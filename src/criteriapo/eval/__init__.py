"""Evaluation: held-out preference accuracy (overall and per criterion)."""
