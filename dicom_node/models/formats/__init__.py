"""Models the node did not train, one module per format (see dicom_node.models.runner)."""
