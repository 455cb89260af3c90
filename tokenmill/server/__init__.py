"""OpenAI-compatible HTTP server (``tokenmill serve``); see docs/server.md."""

from tokenmill.server.cli import add_cli

__all__ = ["add_cli"]
