"""Stage 3, the diffusion hypernetwork: DiHyFo-1/2 models, DDPM/DDIM diffusion, training and
the prompt-alignment evaluation."""
