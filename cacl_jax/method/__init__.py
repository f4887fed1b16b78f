"""The method as pure functions of arrays: the three losses and their kernels, the negatives,
PixPro, pixel shuffle, the queues and the EMA. Imports only jax, numpy and the standard library
(tests/test_layers.py checks it), so every piece can be read and tested on its own."""
