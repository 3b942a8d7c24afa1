"""Stage one, on the GPU box: images -> frozen DINOv3 backbone -> HDF5 cache shards."""
