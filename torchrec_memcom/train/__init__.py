"""DLRM training on Criteo with compressed tables: configs, the distributed loop, checkpoints."""
