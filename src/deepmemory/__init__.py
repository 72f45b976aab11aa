"""deepmemory: test-time memorization sequence models (Titans, ATLAS) in PyTorch."""

__version__ = "0.1.0"
