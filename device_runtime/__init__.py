"""Torch-free side of cartosplit: cost profile, routing policy, CLI entry point (and, later, the runtime).

Everything here imports with numpy alone, so a phone or a Pi-class board can install it without torch.
"""
