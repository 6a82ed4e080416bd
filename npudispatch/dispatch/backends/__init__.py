"""Backends that run fused programs: the emulator (default) and real NPUs through pyxrt."""
