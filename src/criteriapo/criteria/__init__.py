"""Criteria: named, described, and where possible checked by a program."""

from criteriapo.criteria.library import FAMILIES, Criterion, parse_criteria, parse_criterion

__all__ = ["FAMILIES", "Criterion", "parse_criteria", "parse_criterion"]
