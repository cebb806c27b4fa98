"""Temporary: the CLI moves here."""

from cartosplit.device_runtime.cli import main

__all__ = ["main"]
