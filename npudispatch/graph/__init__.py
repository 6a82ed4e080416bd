"""Graph layer: load ONNX models into onnx_ir, networkx views, topological order, tensor lifetimes, partitions."""
