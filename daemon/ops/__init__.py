"""Watching it run: logs, metrics, health, the dashboard, status and systemd."""
