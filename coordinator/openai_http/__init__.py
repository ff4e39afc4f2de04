"""The OpenAI-compatible HTTP front of the coordinator (docs/design.md section 14)."""
