"""Torch-free side of cartosplit: the device runtime, cost profile, routing policy and the device commands.

Everything here imports with numpy alone, so a phone or a Pi-class board can install it without torch.
"""
