from kernels.knn.reference import nearest_neighbors

__all__ = ["nearest_neighbors"]
