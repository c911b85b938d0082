"""Diffusion machinery shared by the diffusion-based methods: DDIM sampling and inversion (ddim.py)."""
