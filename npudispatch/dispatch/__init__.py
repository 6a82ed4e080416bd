"""Dispatch: buffer plan, fused program emission, Session API and backends (emulator, xrt)."""
