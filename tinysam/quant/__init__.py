"""Post-training quantization (TinySAM section 3.2): quantizers, Hessian-guided scale search, INT8 export."""
