"""Helpers of the tests: tiny models, direct references, handmade maps, shared checks."""
