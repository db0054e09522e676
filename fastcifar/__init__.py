"""fastcifar: train CIFAR-10 fast on one machine with an FFCV data path and CustResNet."""

__version__ = "0.1.0"
