"""Other tools' formats: :mod:`bdfast.interop.backdoorbench` reads BackdoorBench's attack
records and writes defense results that BackdoorBench reads back."""
from bdfast.interop import backdoorbench

__all__ = ["backdoorbench"]
