"""Pipeline-parallel training of MLPs on torch.distributed."""
