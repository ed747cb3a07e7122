"""Depth passes, one a file: ``slm`` / ``slm-plus`` (Sliding-Window Merging) and the baselines ``shortgpt``,
``angular``, ``sleb``, ``shortened-*``, ``laco`` and ``drop``; ``slm_official_port`` is the slow literal port of the
official SLM loop that the tests check ``slm`` against."""
