"""The CLI's commands besides ``run``: validate, estimate, show, dead letters, repair."""
