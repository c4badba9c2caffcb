"""The write-ahead manifest: every state change is durable before it acts."""
