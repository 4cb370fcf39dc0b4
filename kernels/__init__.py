"""Loss kernels behind small functional interfaces.

Each op has a plain PyTorch reference (the truth). Faster paths (tiled PyTorch, Triton)
sit beside it behind the same function, chosen by device (kernels/backend.py).
"""
from kernels.contrastive import contrastive_loss, contrastive_loss_local
from kernels.jsd import jsd_loss
from kernels.knn import nearest_neighbors
from kernels.siglip import siglip_loss, siglip_loss_local

__all__ = ["contrastive_loss", "contrastive_loss_local", "jsd_loss", "nearest_neighbors", "siglip_loss",
           "siglip_loss_local"]
