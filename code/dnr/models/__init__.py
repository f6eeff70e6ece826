"""Models: encoders (encoders.py), fusion heads (fusion.py), the classifier (classifier.py)."""
from .classifier import ModelOutput, MultimodalClassifier, create_model
from .encoders import ENCODERS, create_encoder, default_encoder, encoder_options, register_encoder
from .fusion import FUSIONS, FusionOutput, create_fusion
def unwrap(model):
    """The MultimodalClassifier inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


from . import sequence  # noqa: F401,E402  (registers the "transformer" and "mean_mlp" sequence encoders)

__all__ = ["ModelOutput", "MultimodalClassifier", "create_model", "ENCODERS", "create_encoder",
           "default_encoder", "encoder_options", "register_encoder", "FUSIONS", "FusionOutput", "create_fusion",
           "unwrap"]
