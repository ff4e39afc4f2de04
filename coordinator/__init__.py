"""Coordinator: the client-facing Generate API and the decoding schedules (ar, sd, pearl)."""
