"""PEFT methods, one module each, registered by name.

Importing this package registers them all (in the order below); look them up with
:func:`get_method`.
"""
# Registration, in the order `pefttune info` lists the methods.
from pefttune.methods import none  # noqa: F401,I001
from pefttune.methods import adapters  # noqa: F401  houlsby, sequential, parallel
from pefttune.methods import lora  # noqa: F401
from pefttune.methods import bitfit  # noqa: F401
from pefttune.methods import prefix  # noqa: F401
from pefttune.methods import adapterbias  # noqa: F401
from pefttune.methods import ia3  # noqa: F401
from pefttune.methods.base import HParam, LayerMethod, MethodSpec, get_method, method_names, register_method

__all__ = ["HParam", "LayerMethod", "MethodSpec", "get_method", "method_names", "register_method"]
