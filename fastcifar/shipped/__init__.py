"""The shipped weights as package data: `weights/custresnet-cifar10.safetensors` (linked here in
a checkout, copied into wheels), found with importlib.resources wherever fastcifar is installed."""
