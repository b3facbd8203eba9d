"""raymia: distributed evaluation of privacy attacks on ML models and the defenses against them."""

__version__ = "0.1.0"
