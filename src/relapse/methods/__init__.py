"""Methods: the unlearning terms (one module each, named in ``registry``), SURE's mask, SAM, the
quantization-robust objective and utility-preserving selection; they train through
:mod:`relapse.training`."""
