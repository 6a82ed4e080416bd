"""Rewrites: the pass manager and the fusion, folding, padding, precision and aliasing passes."""
