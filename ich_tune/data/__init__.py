"""RSNA data: labels CSV, DICOM slices to Hounsfield units, window channels and resizing."""
