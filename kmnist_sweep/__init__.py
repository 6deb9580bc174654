"""kmnist_sweep: hyperparameter sweeps for Kuzushiji character classification."""

# torchvision (imported by fastai too) must see its operator schemas before anything else runs.
from kmnist_sweep import compat as _compat  # noqa: F401

__version__ = "0.1.0"
