"""Dense -> MLA: the singular spectra and rank report `analyze` writes, calibration forwards that record each
attention's inputs, the per-layer factorisation (svd / asvd / random), the conversion pipeline with its
measurements, and the export folder with its model card. The `analyze` and `convert` commands.
"""
