"""What a training run is made of: recipes, the optimiser and schedule, augmentation, mixup,
metrics, the engine, the run folder and data-parallel helpers.

Empty on purpose: import from the modules, so that importing one layer never pulls in another."""
