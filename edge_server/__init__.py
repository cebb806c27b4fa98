"""Placeholder: filled by a later issue (see README roadmap)."""
