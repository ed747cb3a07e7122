"""Built-in compression passes: ``base`` (the interface), ``depth/`` and ``width/``, one pass a module; each module is
a plugin with a ``register_passes`` hook."""
