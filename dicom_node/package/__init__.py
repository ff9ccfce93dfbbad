"""The model-package contract: manifest, orientation, applicability."""
