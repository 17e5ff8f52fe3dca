"""scikit-learn's bundled digits (1,797 real handwritten images) written out as an ImageFolder."""

from models.data import write_digits_folder

__all__ = ["write_digits_folder"]
