"""A trained model on new slices: any folder of DICOM files scored (scoring.py) and written out
(outputs.py), or metrics on the experiment's labelled data (evaluate.py)."""
