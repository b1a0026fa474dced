"""INT4 weight quantization: packing layout, methods and the artifact format."""
