"""Packaged node shapes: verbatim `nvidia-smi topo -m` outputs of real machines."""
