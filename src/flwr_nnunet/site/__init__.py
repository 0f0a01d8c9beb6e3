"""One hospital: a persistent nnU-Net trainer across rounds, its evaluation, the proximal loss."""
