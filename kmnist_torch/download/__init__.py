"""Getting the official files: where they come from (root, mirrors, settings) and how a
file is fetched, resumed and verified. Torch-free; every download fault is handled here.

Empty on purpose: import from the modules, so that importing one layer never pulls in another."""
