"""Operator library: per-op matching, buffer requirements, transactions, params, weight formatting, kernels, references."""
