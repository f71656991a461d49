"""Helpers the applications share (atomic file writes, progress bars, matplotlib); the kernel library never
imports them."""
