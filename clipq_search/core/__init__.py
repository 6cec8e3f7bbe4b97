"""The CLIP-Q operator, its reference definition, per-layer plans, model surgery and the file format."""
