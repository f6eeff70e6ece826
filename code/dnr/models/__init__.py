"""Models: encoders (encoders.py), fusion heads (fusion.py), the classifier (classifier.py)."""
from .classifier import ModelOutput, MultimodalClassifier, create_model
from .encoders import ENCODERS, create_encoder, default_encoder, encoder_options, register_encoder
from .fusion import FUSIONS, FusionOutput, create_fusion

__all__ = ["ModelOutput", "MultimodalClassifier", "create_model", "ENCODERS", "create_encoder",
           "default_encoder", "encoder_options", "register_encoder", "FUSIONS", "FusionOutput", "create_fusion"]
