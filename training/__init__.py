"""Training code for the calibrated CIFAR-10 classifiers (data loading, training, evaluation)."""
