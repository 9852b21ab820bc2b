"""Python SDK and CLI for Usher."""
