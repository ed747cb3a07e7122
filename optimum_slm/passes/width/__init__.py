"""Width passes (one pass a file): narrowing MLP channels and attention KV groups. None ships yet; the plan's op
registry and running shape (plan/ops.py) are where their op kinds join."""
