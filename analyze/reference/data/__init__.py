"""Data files of reference mode (MoE-CAP reference tables); a package so every installer ships them."""
