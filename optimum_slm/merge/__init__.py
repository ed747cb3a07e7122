"""Merge rules: how a window of decoder layers collapses into one layer (``rules``), and the fitted ``calibrated``
rule's least-squares branch scales (``calibrated``)."""

from .rules import MERGE_RULES, MergeRule, get_merge_rule, merge_rules

__all__ = ["MERGE_RULES", "MergeRule", "get_merge_rule", "merge_rules"]
