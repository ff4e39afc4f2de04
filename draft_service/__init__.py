"""DraftService: a small model drafting tokens ahead for many sessions at once."""
