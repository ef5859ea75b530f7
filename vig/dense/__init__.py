"""Dense prediction with ViG: backbone adapters, Mask R-CNN and UperNet models, evaluation, fine-tuning.

Modules are imported individually; this package imports nothing itself so that the model-only path
(e.g. `python -m vig.dense.bench_maskrcnn` on a GPU box with only torch/torchvision/timm) never
pulls in Ray, MLflow or the data readers.
"""
