"""Independent PyTorch reference of CAMANet (reference spec), used only by the tests."""
