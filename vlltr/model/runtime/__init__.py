"""The torch-free model runtime: a bundle's format, loader and everything it is made of and read with.

Imports numpy, Pillow, tokenizers and onnxruntime only (never torch, open_clip or torchvision), so the service
and the exporter both use it and the serving image holds no torch.
"""
