"""Everything MLflow: tags, the store and its client, the trial callback, publishing the best model, the
registry, the pyfunc model, --model references and `report`."""
