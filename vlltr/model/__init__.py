"""The model library that training and the service share.

- `vlltr.model.networks` (torch, open_clip): the backbone factory, the stage-1 CVLP wrapper, the LGR head and
  the stage-2 classifier.
- `vlltr.model.runtime` (no torch): what a bundle is made of and read with: its format and loader, the eval
  preprocessing, the tokenizer, the prompts, the numpy head, ONNX Runtime sessions and the offline predictor.

This package imports neither, so `import vlltr.model.runtime` never loads torch.
"""
