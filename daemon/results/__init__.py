"""From an ended batch to the sinks: the join on custom_id, routing, dead letters."""
