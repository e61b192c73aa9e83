"""The registry's entries by family, each beside the kernel that computes it."""
