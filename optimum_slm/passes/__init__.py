"""Built-in compression passes, one a module. Each module is a plugin with a ``register_passes`` hook."""
