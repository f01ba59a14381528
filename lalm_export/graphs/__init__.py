"""ONNX graphs: building the ones Optimum does not (the fused decoder, the decoder on
`inputs_embeds`), rewrites that keep the math, and reading and writing graph files."""
