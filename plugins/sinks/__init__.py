"""Built-in sinks; each registers through ``register_sinks`` like any plugin."""
