"""Functional emulator of an AIE2P NPU partition that executes transaction binaries."""
