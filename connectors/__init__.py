"""Built-in source connectors; each registers through ``register_sources`` like any plugin."""
