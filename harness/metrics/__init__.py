"""Generation metrics: IS / FID / KID (torch-fidelity), IC-LPIPS and LPIPS to real, background and mask metrics;
detection metrics; what each metric is (specs.py). Import the submodules: this package imports nothing itself, so
that the torch-free ones (specs, iclpips_presets) stay light."""
