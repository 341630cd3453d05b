"""fastkd: knowledge distillation for image classification, every method, fast."""
__version__ = "0.1.0"
