"""PyTorch interop: torchvision / MoCo state-dict layouts and the `convert` program's work."""
