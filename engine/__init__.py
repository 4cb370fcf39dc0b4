"""clipzero: config-free DeepSpeed ZeRO pretraining of data-efficient CLIP models."""
