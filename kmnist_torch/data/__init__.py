"""From files on disk to tensors: the formats, the dataset classes and their registry, the
splits and re-splits, verification, and the device-resident loader.

Empty on purpose: import from the modules, so that importing one layer never pulls in another."""
