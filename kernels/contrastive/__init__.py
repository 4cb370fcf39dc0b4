from kernels.contrastive.reference import contrastive_loss, contrastive_loss_local

__all__ = ["contrastive_loss", "contrastive_loss_local"]
