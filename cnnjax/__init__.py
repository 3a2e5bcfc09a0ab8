"""cnnjax: the convnet lecture (MNIST, cats vs dogs, augmentation, dropout, inspection) in
JAX/Flax."""

__version__ = "0.1.0"
