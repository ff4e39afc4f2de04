"""The face of the project: the `pearl` command and a small Python client."""
