"""The OpenAI-compatible HTTP front of the coordinator (issue 28; docs/design.md section 14)."""
