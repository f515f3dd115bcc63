"""Distribution-shift evaluation: CIFAR-10-C corruptions, their cached data sets and the benchmark over them."""
