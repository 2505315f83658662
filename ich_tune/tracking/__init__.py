"""Everything MLflow: tags, the store and its client, the trial callback and what of a trial it records,
what mattered in a search, publishing the best model, the registry, the pyfunc model, --model
references and `report`."""
