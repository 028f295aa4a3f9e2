"""Model architectures the tests build themselves (no hub downloads, no torchvision needed)."""
