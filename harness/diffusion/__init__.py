"""Diffusion machinery shared by the diffusion-based methods (issue 5, in progress): DDIM sampling and inversion
(ddim.py), latent text-to-image backbones behind one interface, SD 1.5 or a tiny CPU stand-in (backbone.py), the
tiny backbone's pretraining (pretrain.py), and attention processors: masked cross-attention and attention-map
recording on chosen UNet layers (attention.py)."""
