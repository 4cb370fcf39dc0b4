from kernels.jsd.reference import jsd_loss

__all__ = ["jsd_loss"]
