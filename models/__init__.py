"""Model code: calibration math (NumPy only) and Keras model pieces."""
