"""The engine: config, manifest, packer, API client, poller, collector, supervisor, CLI."""
