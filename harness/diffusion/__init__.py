"""The diffusion toolkit every diffusion generator shares (backbones, pretraining, DDIM, LoRA, attention processors,
placeholders, the fine-tuning loop); see README.md in this folder."""
