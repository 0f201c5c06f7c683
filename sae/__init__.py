"""pluristeer's plain-PyTorch core: LM loading, residual hooks, sparse autoencoders. No Ray in here."""

from sae.hooks import capture, decoder_layers, num_layers, residuals, resolve_layer, steer
from sae.lm import EMBEDDED, ModelNotFoundError, load_lm, load_tokenizer, model_name, resolve_model
from sae.model import SAEConfig, SAEFormatError, SparseAutoencoder

__all__ = [
    "EMBEDDED",
    "ModelNotFoundError",
    "SAEConfig",
    "SAEFormatError",
    "SparseAutoencoder",
    "capture",
    "decoder_layers",
    "load_lm",
    "load_tokenizer",
    "model_name",
    "num_layers",
    "residuals",
    "resolve_layer",
    "resolve_model",
    "steer",
]
