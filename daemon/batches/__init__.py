"""Talking to the Message Batches API: create, adopt, poll, and what errors mean."""
