"""Outputs: the DICOM objects made from a result (SEG, SR, overlay) and their measurements."""
