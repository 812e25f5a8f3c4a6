"""archlab: compare sequence-model architectures fairly, at scale, and keep every result.

Importing this package is deliberately cheap: no torch, ray, mlflow or triton import
happens here, so `archlab --help` stays fast (see STACK_NOTES: each costs seconds).
"""

__version__ = "0.1.0"
