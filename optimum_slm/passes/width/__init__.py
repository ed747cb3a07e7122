"""Width passes, one a file: ``flap``, ``taylor-width`` (LLM-Pruner), ``minitron-width``. They narrow every layer's
MLP channels and attention KV groups / query heads to the same widths through the ``narrow_mlp`` / ``narrow_attn``
op kinds (plan/width_ops.py); ``common`` holds the target widths, input statistics and op building they share."""
