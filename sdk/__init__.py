"""edgepack: student model -> quantize -> lower(target) -> bundle -> verify/profile -> runtime."""

__version__ = "0.1.0"
FORMAT_VERSION = 1  # bundle manifest format; bump on any incompatible change
